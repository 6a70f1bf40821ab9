"""Save and load trained routers: ``router.safetensors`` + ``router.json`` (never pickle).

The JSON records the base model's identity (:func:`algos.fingerprint.base_identity`: name,
structure and the weight fingerprint, which is the same for fp32 and bf16 copies of one model),
the router sizes, the window count, training metrics and the default of the p knob. Loading
checks the identity against the model at hand and raises a one-line ValueError on a mismatch
(exports older than version 2 have no weight fingerprint: loaded with a warning, weights unchecked).
Writes go to a temporary directory that is renamed into place.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from algos.fingerprint import base_identity, weights_mismatch
from algos.models import model_identity
from routers.router import PURE_ROUTER_P, PathRouter

FORMAT = "repro-rl/drllm-router"
VERSION = 2  # 2: base_model carries weights_fingerprint (algos.fingerprint)
WEIGHTS_FILE = "router.safetensors"
META_FILE = "router.json"
_STRUCTURAL_KEYS = ("model_type", "num_hidden_layers", "hidden_size", "vocab_size")


def tensor_digest(tensors) -> str:
    """sha256 (16 hex) of the tensors' float32 bytes, in order."""
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def save_router(router: PathRouter, out_dir: str | os.PathLike, model, metrics: dict | None = None,
                p_default: float = PURE_ROUTER_P, extra: dict | None = None) -> Path:
    """Write the router for ``model`` to ``out_dir`` atomically; returns the directory."""
    out_dir = Path(out_dir)
    identity = base_identity(model)
    if (identity["num_hidden_layers"], identity["hidden_size"]) != (router.num_layers, router.hidden_size):
        raise ValueError(f"router has {router.num_layers} blocks of width {router.hidden_size} but the model has "
                         f"{identity['num_hidden_layers']} of width {identity['hidden_size']}")
    meta = {
        "format": FORMAT, "version": VERSION, "base_model": identity,
        "num_layers": router.num_layers, "hidden_size": router.hidden_size,
        "router_hidden": router.router_hidden, "num_windows": router.num_windows, "num_actions": 3,
        "actions": {"0": "skip", "1": "execute", "2": "repeat"},
        "p_default": float(p_default), "metrics": metrics or {}, **(extra or {}),
    }
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", suffix=".tmp", dir=out_dir.parent))
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in router.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def check_identity(saved: dict, model, where: str = "router", check_weights: bool = True) -> None:
    """Raise a one-line ValueError when ``model`` is not the model the export was made for (structure,
    then the weight fingerprint unless ``check_weights=False``)."""
    current = model_identity(model)
    for key in _STRUCTURAL_KEYS:
        if saved.get(key) != current.get(key):
            raise ValueError(f"{where} was trained for {saved.get('name') or 'another model'} with {key}="
                             f"{saved.get(key)}, but the model given has {key}={current.get(key)}; "
                             "load it with the model it was trained on")
    problem = weights_mismatch(saved, model, where) if check_weights else None
    if problem:
        raise ValueError(problem)


def load_router(path: str | os.PathLike, model=None, device=None, check_weights: bool = True) -> tuple[PathRouter, dict]:
    """(router, metadata) from a directory written by :func:`save_router`, checked against ``model``."""
    path = Path(path)
    meta_path, weights_path = path / META_FILE, path / WEIGHTS_FILE
    if not meta_path.exists() or not weights_path.exists():
        raise ValueError(f"no router export at '{path}' (expected {META_FILE} and {WEIGHTS_FILE})")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"'{path}' holds format {meta.get('format')!r}, not a Dr.LLM router ({FORMAT})")
    if model is not None:
        check_identity(meta["base_model"], model, where=f"router '{path}'", check_weights=check_weights)
    router = PathRouter(meta["num_layers"], meta["hidden_size"], meta["router_hidden"], meta["num_windows"])
    router.load_state_dict(load_file(str(weights_path)))
    if device is not None:
        router.to(device)
    return router.eval(), meta
