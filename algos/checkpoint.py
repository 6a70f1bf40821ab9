"""Checkpoints: HF-format model + tokenizer (+ adapter) and the full trainer state.

A checkpoint is written to ``.checkpoint-N.tmp`` and renamed to ``checkpoint-N`` only once
complete, so a run killed mid-save leaves the previous checkpoint loadable; old ones are
rotated away only after the new one exists.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

STATE_DIR = "trainer_state"
STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


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
        raise FileNotFoundError(f"--resume_from_checkpoint={spec}: not a complete checkpoint "
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
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp / STATE_DIR), safe_serialization=True)
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        policy = getattr(unwrapped, "policy", unwrapped)
        if state_dict is not None and policy is not unwrapped:
            state_dict = {k[len("policy."):]: v for k, v in state_dict.items() if k.startswith("policy.")}
        policy.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
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
