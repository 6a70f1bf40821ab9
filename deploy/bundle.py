"""The deploy bundle: one directory with the policy, its LYNX probe and its Dr.LLM router.

    bundle/
      model/          HF model + tokenizer (a LoRA policy is merged; keep_adapter also writes adapter/)
      probe/          the LYNX export (optional)
      router/         the Dr.LLM export (optional)
      manifest.json   format, versions, base-model identity, sha256 of every file

A probe or router trained for another model is refused with one line before anything is written:
both are checked against the policy (a LoRA policy merged, also when the adapter is kept, as the
decoder merges it) by structure and by :func:`algos.fingerprint.weight_fingerprint`, which the
manifest records too (``base_model``). The bundle is written to a temporary directory and renamed
when complete; an existing directory is replaced only with ``overwrite``.
``deploy.decoder.EfficientDecoder.from_pretrained`` loads it.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import time
from importlib import metadata
from pathlib import Path

FORMAT, VERSION, MANIFEST = "repro-rl-bundle", 1, "manifest.json"


class BundleError(ValueError):
    """A part cannot go into the bundle; the message names what to fix."""


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_policy(path: str):
    """(model, tokenizer, adapter model or None): a LoRA checkpoint (adapter_config.json) is loaded
    on its base model; anything else goes through the project's loader (hub id, path, default)."""
    from algos.models import load_causal_lm, load_tokenizer

    if (Path(path) / "adapter_config.json").is_file():
        from peft import AutoPeftModelForCausalLM

        peft_model = AutoPeftModelForCausalLM.from_pretrained(path)
        try:
            tokenizer = load_tokenizer(path)
        except Exception:
            tokenizer = load_tokenizer(peft_model.peft_config["default"].base_model_name_or_path)
        return peft_model, tokenizer, peft_model
    return load_causal_lm(path), load_tokenizer(path), None


def export_bundle(policy: str, out: str | os.PathLike, probe: str | None = None, router: str | None = None,
                  keep_adapter: bool = False, overwrite: bool = False) -> Path:
    from algos.fingerprint import base_identity
    from probes.export import ProbeLoadError, load_probe
    from routers.export import load_router

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise BundleError(f"'{out}' exists and is not empty; pass --overwrite or choose another --out")
    model, tokenizer, adapter = load_policy(policy)
    if adapter is not None:
        model = adapter.merge_and_unload() if not keep_adapter else adapter
    # the weights the parts must fit: the policy, a kept adapter merged into a copy (as the decoder merges it)
    policy_model = copy.deepcopy(adapter).merge_and_unload() if keep_adapter and adapter is not None else model
    try:  # check every part before writing anything
        if probe:
            load_probe(probe, model=policy_model)
        if router:
            load_router(router, model=policy_model)
    except (ProbeLoadError, ValueError) as exc:
        raise BundleError(str(exc).splitlines()[0]) from exc

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        if keep_adapter and adapter is not None:
            adapter.save_pretrained(tmp / "adapter")
            adapter.unload().save_pretrained(tmp / "model")  # the base weights, LoRA layers taken out
        else:
            model.save_pretrained(tmp / "model")
        tokenizer.save_pretrained(tmp / "model")
        if probe:
            shutil.copytree(probe, tmp / "probe", ignore=shutil.ignore_patterns("*.tmp*"))
        if router:
            shutil.copytree(router, tmp / "router", ignore=shutil.ignore_patterns("*.tmp*"))
        files = {str(p.relative_to(tmp)): _sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest = {
            "format": FORMAT, "version": VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "policy_source": str(policy), "base_model": base_identity(policy_model),
            "parts": {"model": "model", "probe": "probe" if probe else None, "router": "router" if router else None,
                      "adapter": "adapter" if keep_adapter and adapter is not None else None},
            "lora_merged": adapter is not None and not keep_adapter,
            "versions": {p: _version(p) for p in ("repro-rl", "torch", "transformers", "peft", "safetensors")},
            "files": files,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def verify_bundle(path: str | os.PathLike) -> dict:
    """The manifest, after checking every file's sha256 (BundleError on any difference)."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BundleError(f"no readable {MANIFEST} in '{path}': {str(exc).splitlines()[0]}") from exc
    if manifest.get("format") != FORMAT:
        raise BundleError(f"'{path}' is not a repro-rl bundle (format {manifest.get('format')!r})")
    for name, digest in manifest["files"].items():
        if not (path / name).is_file() or _sha256(path / name) != digest:
            raise BundleError(f"bundle file '{name}' is missing or changed since export")
    return manifest


def is_bundle(path) -> bool:
    """True if ``path`` is a directory holding a bundle manifest."""
    return (Path(path) / MANIFEST).is_file()
