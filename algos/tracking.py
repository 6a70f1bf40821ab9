"""Metric sinks: metrics.jsonl (always), W&B (offline without an API key) or TensorBoard."""
from __future__ import annotations

import json
import math
import netrc
import os
from pathlib import Path


def wandb_has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def _line_step(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


class RunTracker:
    """Writes scalar metrics and sample tables; only the main process should create one."""

    def __init__(self, output_dir: str, report_to: str, run_name: str, project: str, config: dict):
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.metrics_file = open(self.dir / "metrics.jsonl", "a")
        self.samples_file = open(self.dir / "completions.jsonl", "a")
        self.report_to = report_to
        self.wandb = self.tensorboard = None
        if report_to == "wandb":
            import wandb

            if not wandb_has_credentials() and "WANDB_MODE" not in os.environ:
                os.environ["WANDB_MODE"] = "offline"
                print("[repro-rl] no W&B API key found: logging to W&B in offline mode "
                      f"({self.dir / 'wandb'}; `wandb sync` uploads it later)", flush=True)
            self.wandb = wandb.init(project=project, name=run_name, config=config,
                                    dir=str(self.dir), reinit="finish_previous")
        elif report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=str(self.dir / "tensorboard"))

    def keep_until(self, step: int) -> None:
        """Keep only the metric and completion lines of steps <= ``step`` (-1: none), so a fresh
        run in an old output_dir, or a resumed one, does not mix in lines from another run."""
        for name in ("metrics_file", "samples_file"):
            handle = getattr(self, name)
            handle.close()
            path = Path(handle.name)
            kept = [line for line in path.read_text().splitlines(keepends=True)
                    if (line_step := _line_step(line)) is not None and line_step <= step]
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text("".join(kept))
            os.replace(tmp, path)
            setattr(self, name, open(path, "a"))

    def log(self, metrics: dict, step: int) -> None:
        clean = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
        self.metrics_file.write(json.dumps({"step": step, **clean}) + "\n")
        self.metrics_file.flush()
        if self.wandb is not None:
            self.wandb.log(clean, step=step)
        if self.tensorboard is not None:
            for key, value in clean.items():
                self.tensorboard.add_scalar(key, value, step)

    def log_samples(self, rows: list[dict], step: int) -> None:
        for row in rows:
            self.samples_file.write(json.dumps({"step": step, **row}) + "\n")
        self.samples_file.flush()
        if self.wandb is not None and rows:
            import wandb

            columns = list(rows[0])
            table = wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows])
            self.wandb.log({"completions": table}, step=step)
        if self.tensorboard is not None:
            text = "\n\n".join(f"**{r.get('reward', '')}** {r.get('completion', '')}" for r in rows)
            self.tensorboard.add_text("completions", text, step)

    def close(self) -> None:
        self.metrics_file.close()
        self.samples_file.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.tensorboard is not None:
            self.tensorboard.close()
