"""Save and load a LYNX probe: a directory with ``probe.safetensors`` + ``lynx_probe.json``.

The safetensors file holds the MLP and its standardisation buffers; the JSON holds everything else
needed to decode with it: the base model's identity (:func:`algos.fingerprint.base_identity`: name,
model type, layer count, hidden size, vocabulary size and the weight fingerprint), the hidden-state
layers used (HF ``hidden_states`` indices, 0 = embeddings), the cue settings, the exit string, the
answer budget, the conformal calibration scores (so the confidence is picked at decode time), the
setting the calibration features came from (``calibrated_with``: dtype, routing) and the training
metrics. No pickles. Writing goes to a temporary directory that is renamed into place.

Loading with ``model=`` checks the identity: a different architecture (type, layers, hidden size,
vocabulary) always fails; other weights fail by the fingerprint (an fp32 and a bf16 copy of one
model match; an export without a fingerprint, older than version 2, loads with a warning); a
different name fails unless ``check_name=False`` (the same weights under another path). Every
failure is one :class:`ProbeLoadError` line naming what to fix.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from algos.fingerprint import weights_mismatch
from algos.models import model_identity
from probes.conformal import ConformalCalibration, ExitRule
from probes.cues import CueConfig
from probes.probe import ExitProbe

FORMAT = "repro-rl/lynx-probe"
VERSION = 2  # 2: base_model has weights_fingerprint; calibrated_with
WEIGHTS_FILE = "probe.safetensors"
CONFIG_FILE = "lynx_probe.json"
_STRUCTURE = ("model_type", "num_hidden_layers", "hidden_size", "vocab_size")


class ProbeLoadError(ValueError):
    """A probe directory is missing, malformed, or made for another model."""


@dataclass
class LynxProbe:
    """Everything the online decoder needs: probe, calibration, layers, cues, exit string."""

    probe: ExitProbe
    calibration: ConformalCalibration
    layers: tuple[int, ...]
    cue_config: CueConfig
    exit_string: str
    base_model: dict
    answer_max_tokens: int = 64
    default_confidence: float | None = None
    metrics: dict = field(default_factory=dict)
    calibrated_with: dict = field(default_factory=dict)  # {"dtype": "float32", "routing": False}; {} = unknown

    def rule(self, confidence: float | None = None) -> ExitRule:
        """Exit rule at confidence c (default: the confidence chosen at export)."""
        c = self.default_confidence if confidence is None else confidence
        if c is None:
            raise ValueError("no confidence given and the probe has no default; pass confidence=0.9 (for example)")
        return self.calibration.rule(confidence=c)

    @torch.no_grad()
    def score(self, features: torch.Tensor) -> torch.Tensor:
        """P(safe to exit) for (N, D) features."""
        return self.probe.predict_proba(features)


def _same_name(a: str, b: str) -> bool:
    if not a or not b or a.rstrip("/") == b.rstrip("/"):
        return True  # an unnamed model (built from a config) cannot be told apart by name
    return os.path.isdir(a) and os.path.isdir(b) and os.path.realpath(a) == os.path.realpath(b)


def check_compatible(base: dict, model, where: str = "the probe", check_name: bool = True,
                     check_weights: bool = False) -> None:
    """Raise :class:`ProbeLoadError` (one line) unless ``model`` has the structure (and name) ``base``
    describes; with ``check_weights`` also its weights (:func:`algos.fingerprint.weights_mismatch`)."""
    current = model_identity(model)
    diffs = [f"{k} {base.get(k)} != {current.get(k)}" for k in _STRUCTURE if base.get(k) != current.get(k)]
    if check_name and not _same_name(str(base.get("name") or ""), str(current.get("name") or "")):
        diffs.append(f"name '{base.get('name')}' != '{current.get('name')}' "
                     "(pass check_name=False if these are the same weights under another path)")
    if diffs:
        raise ProbeLoadError(f"{where} was trained for another model ({'; '.join(diffs)}); "
                             "load the model it was trained on or train a probe for this one")
    problem = weights_mismatch(base, model, where) if check_weights else None
    if problem:
        raise ProbeLoadError(problem)


def save_probe(directory, bundle: LynxProbe) -> Path:
    """Write ``bundle`` to ``directory`` atomically (replacing an existing export); returns the path."""
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": FORMAT, "version": VERSION,
        "base_model": bundle.base_model,
        "layers": list(bundle.layers),
        "feature_dim": bundle.probe.input_dim,
        "hidden": list(bundle.probe.hidden),
        "cues": bundle.cue_config.to_dict(),
        "exit_string": bundle.exit_string,
        "answer_max_tokens": bundle.answer_max_tokens,
        "default_confidence": bundle.default_confidence,
        "calibration": bundle.calibration.to_dict(),
        "calibrated_with": bundle.calibrated_with,
        "metrics": bundle.metrics,
    }
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in bundle.probe.state_dict().items()}
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
        with open(tmp / CONFIG_FILE, "w") as f:
            json.dump(meta, f, indent=1, allow_nan=True)
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_probe(directory, model=None, check_name: bool = True, check_weights: bool = True) -> LynxProbe:
    """Load an export; with ``model`` given, refuse (ProbeLoadError) if it is not the base model
    (``check_weights=False``: structure and name only)."""
    path = Path(directory)
    if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise ProbeLoadError(f"no LYNX probe at '{path}' (expected {CONFIG_FILE} and {WEIGHTS_FILE}); "
                             "run train/lynx_probe.py or fix the path")
    try:
        with open(path / CONFIG_FILE) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ProbeLoadError(f"cannot read '{path / CONFIG_FILE}': {exc}".splitlines()[0]) from exc
    if meta.get("format") != FORMAT or int(meta.get("version", 0)) > VERSION:
        raise ProbeLoadError(f"'{path}' is not a LYNX probe export this version can read "
                             f"(format {meta.get('format')!r}, version {meta.get('version')!r})")
    if model is not None:
        check_compatible(meta["base_model"], model, where=f"the probe at '{path}'", check_name=check_name,
                         check_weights=check_weights)
    probe = ExitProbe(int(meta["feature_dim"]), tuple(meta["hidden"]))
    try:
        probe.load_state_dict(load_file(str(path / WEIGHTS_FILE)))
    except (RuntimeError, OSError) as exc:
        raise ProbeLoadError(f"'{path / WEIGHTS_FILE}' does not match {CONFIG_FILE}: "
                             f"{str(exc).splitlines()[0]}") from exc
    probe.eval()
    return LynxProbe(
        probe=probe,
        calibration=ConformalCalibration.from_dict(meta["calibration"]),
        layers=tuple(int(i) for i in meta["layers"]),
        cue_config=CueConfig.from_dict(meta["cues"]),
        exit_string=meta["exit_string"],
        base_model=meta["base_model"],
        answer_max_tokens=int(meta.get("answer_max_tokens", 64)),
        default_confidence=meta.get("default_confidence"),
        metrics=meta.get("metrics", {}),
        calibrated_with=meta.get("calibrated_with", {}),
    )


__all__ = ["LynxProbe", "ProbeLoadError", "check_compatible", "load_probe", "save_probe"]
