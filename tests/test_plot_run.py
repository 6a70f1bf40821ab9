"""scripts/plot_run.py draws curves from metrics.jsonl alone and stops with one line without it."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "plot_run.py"


def test_plot_run_writes_png_from_local_logs(tmp_path):
    rows = [{"step": s, "reward/mean": 0.1 * s, "rewards/accuracy": 0.05 * s, "completion_length/mean": 20 - s,
             "kl": 0.01 * s} for s in range(1, 6)] + [{"step": 5, "eval/accuracy": 0.4}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{\"step\": 6, \"rew")
    out = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    png = tmp_path / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert not list(tmp_path.glob("*.tmp.png"))


def test_plot_run_without_metrics_is_one_line(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True)
    assert out.returncode != 0 and "no metrics.jsonl" in out.stderr and len(out.stderr.strip().splitlines()) == 1
