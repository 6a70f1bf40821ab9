"""Checkpoints: HF-format model + tokenizer (+ adapter) and the full trainer state.

A checkpoint is written to ``.checkpoint-N.tmp`` and renamed to ``checkpoint-N`` only once
complete, so a run killed mid-save leaves the previous checkpoint loadable; old ones are
rotated away only after the new one exists.

The policy's weights are stored once: the HF-format files at the checkpoint's top level (a LoRA
policy's adapter, its frozen base being the launch's ``--model_name_or_path``) are what a resume
loads, and Accelerate's state directory holds the optimizer, schedule and RNG states without a
second copy of the weights (``register_save_state_pre_hook``, as diffusers' training scripts use
it). ``trainer_state.json`` marks such a checkpoint (``"policy_weights": "hf"``) and keeps the
weights' checksum, which a resume checks. For PPO's actor-critic the state directory keeps the
critic's weights only (the value head and a separate critic backbone are not in the HF files).
Under DeepSpeed (its own checkpoint format) the state directory keeps every weight.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

STATE_DIR = "trainer_state"
STATE_FILE = "trainer_state.json"
WEIGHTS_IN_HF = "hf"  # trainer_state.json's "policy_weights": the HF-format files hold them
_NAME = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint cannot be resumed; the message says what to fix."""


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _NAME.match(p.name)) and (p / STATE_FILE).exists()]
    return [p for _, p in sorted(found)]


def resolve_resume(output_dir: str | Path, spec: str) -> Path | None:
    """'latest' -> newest complete checkpoint in output_dir (None if there is none); else a path."""
    if not spec:
        return None
    if spec == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(spec)
    if not (path / STATE_FILE).exists():
        raise CheckpointError(f"--resume_from_checkpoint={spec}: not a complete checkpoint "
                                f"(no {STATE_FILE} in it)")
    return path


def save_checkpoint(accelerator, model, tokenizer, output_dir: str | Path, step: int,
                    trainer_state: dict, save_total_limit: int = 0, name: str | None = None) -> Path:
    """Write checkpoint-<step> (or ``name``) atomically; all processes must call this."""
    root = Path(output_dir)
    final = root / (name or f"checkpoint-{step}")
    tmp = root / f".{final.name}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / STATE_DIR).mkdir(parents=True)  # before the barrier: every process writes its RNG state there
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)
    unwrapped = accelerator.unwrap_model(model)
    policy = getattr(unwrapped, "policy", unwrapped)
    if accelerator.is_main_process:
        if state_dict is not None and policy is not unwrapped:
            state_dict = {k[len("policy."):]: v for k, v in state_dict.items() if k.startswith("policy.")}
        policy.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    # only the main process writes weights; the others follow its layout
    weights_in_hf = not accelerator.is_main_process or _hf_files_hold(policy, tmp)

    def drop_policy_weights(models, weights, _output_dir):  # Accelerate's save_state pre-hook
        if weights_in_hf and len(weights) == len(models):  # not DeepSpeed / FSDP: those save their own way
            i = _index_of(accelerator, models, unwrapped)
            if policy is unwrapped:
                del weights[i]
            else:  # PPO's actor-critic: the critic's weights stay (keys as Accelerate names them, e.g. under DDP)
                weights[i] = _without(weights[i], policy)
            trainer_state["policy_weights"] = WEIGHTS_IN_HF

    handle = accelerator.register_save_state_pre_hook(drop_policy_weights)
    try:
        accelerator.save_state(str(tmp / STATE_DIR), safe_serialization=True)
    finally:
        handle.remove()
    accelerator.wait_for_everyone()  # every process's RNG state is in tmp before it is renamed
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=2))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        if save_total_limit > 0 and name is None:
            for old in list_checkpoints(root)[:-save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_trainer_state(checkpoint: Path) -> dict:
    return json.loads((Path(checkpoint) / STATE_FILE).read_text())


def load_checkpoint(accelerator, model, checkpoint: Path, state: dict, checksums) -> None:
    """Accelerate's state from ``checkpoint`` (optimizer, schedule, RNG), and the policy's weights
    from its HF-format files where the checkpoint stores them there (module doc); those are checked
    against the saved ``rank_weight_checksums`` with ``checksums()`` (every process's sum of weights)."""
    checkpoint = Path(checkpoint)
    if state.get("policy_weights") != WEIGHTS_IN_HF:  # weights in the state directory (DeepSpeed, older)
        accelerator.load_state(str(checkpoint / STATE_DIR))
        return
    unwrapped = accelerator.unwrap_model(model)
    policy = getattr(unwrapped, "policy", unwrapped)
    if policy is unwrapped:
        def skip_policy(models, _input_dir):  # Accelerate's load_state pre-hook
            del models[_index_of(accelerator, models, unwrapped)]

        handle = accelerator.register_load_state_pre_hook(skip_policy)
        try:
            accelerator.load_state(str(checkpoint / STATE_DIR))
        finally:
            handle.remove()
    else:  # PPO's actor-critic: the state directory holds the critic's weights, the HF files the policy's
        accelerator.load_state(str(checkpoint / STATE_DIR), strict=False)  # the checksum below sees a miss
    _load_hf_weights(policy, checkpoint)
    saved, now = state["rank_weight_checksums"][0], checksums()
    if any(abs(x - saved) > 1e-9 * max(1.0, abs(saved)) for x in now):
        raise CheckpointError(f"checkpoint {checkpoint}: the weights loaded (checksum {now[0]:.6g}) are not the ones "
                              f"saved ({saved:.6g}); resume with the run's --model_name_or_path "
                              f"({state['config'].get('model_name_or_path')})")


def _index_of(accelerator, models: list, unwrapped) -> int:
    """Where Accelerate's model list holds ``unwrapped`` (as itself, or wrapped for DDP)."""
    return next(i for i, m in enumerate(models) if accelerator.unwrap_model(m) is unwrapped)


def _without(state_dict: dict, part) -> dict:
    """``state_dict`` less the tensors that share storage with ``part``'s (whatever their key prefix)."""
    storage = {t.untyped_storage().data_ptr() for t in part.state_dict().values()}
    return {k: v for k, v in state_dict.items() if v.untyped_storage().data_ptr() not in storage}


def _is_peft(policy) -> bool:
    return hasattr(policy, "peft_config")


def _safetensors_files(folder: Path, stem: str) -> list[Path]:
    """``stem``.safetensors, or the shards its ``.index.json`` lists; [] if neither is there."""
    index = folder / f"{stem}.safetensors.index.json"
    if index.exists():
        return [folder / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    single = folder / f"{stem}.safetensors"
    return [single] if single.exists() else []


def _unsaved_keys(policy, saved: set[str]) -> list[str]:
    """State-dict keys of ``policy`` that are not in ``saved`` and share no storage with a saved
    tensor (tied weights such as ``lm_head.weight`` are saved once, under the embedding's key)."""
    tensors = policy.state_dict()
    saved_storage = {tensors[k].untyped_storage().data_ptr() for k in saved if k in tensors}
    return [k for k, t in tensors.items() if k not in saved and t.untyped_storage().data_ptr() not in saved_storage]


def _hf_files_hold(policy, folder: Path) -> bool:
    """Whether the HF-format files just written to ``folder`` hold every weight a resume needs."""
    from safetensors import safe_open

    if _is_peft(policy):  # the adapter; the frozen base comes from --model_name_or_path
        return bool(_safetensors_files(folder, "adapter_model"))
    files = _safetensors_files(folder, "model")
    keys = set()
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            keys.update(handle.keys())
    return bool(files) and not _unsaved_keys(policy, keys)


def _load_hf_weights(policy, checkpoint: Path) -> None:
    """Copy the checkpoint's HF-format weights into ``policy`` in place (the optimizer keeps its
    parameters)."""
    from safetensors.torch import load_file

    stem = "adapter_model" if _is_peft(policy) else "model"
    files = _safetensors_files(checkpoint, stem)
    if not files:
        raise CheckpointError(f"checkpoint {checkpoint} has no {stem}.safetensors: it is incomplete; "
                              "resume from another one")
    weights = {}
    for f in files:
        weights.update(load_file(str(f), device="cpu"))
    if _is_peft(policy):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(policy, weights)
        return
    result = policy.load_state_dict(weights, strict=False)
    missing = _unsaved_keys(policy, set(weights))
    if result.unexpected_keys or missing:
        raise CheckpointError(f"checkpoint {checkpoint} does not fit this model "
                              f"({len(missing)} weights missing, {len(result.unexpected_keys)} unexpected, "
                              f"e.g. {(missing or result.unexpected_keys)[0]}): "
                              "resume with the run's --model_name_or_path")
