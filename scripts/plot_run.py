"""Training curves from a run's local logs (``metrics.jsonl``; no W&B needed).

    python scripts/plot_run.py runs/quickstart_grpo            # writes runs/quickstart_grpo/curves.png

Panels: reward (mean and each component), accuracy (training and held-out), completion length,
KL (and entropy when there is no KL). A panel with no logged series is left out.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

PANELS = [
    ("reward", lambda k: k == "reward/mean" or k.startswith("rewards/")),
    ("accuracy", lambda k: k in ("accuracy", "eval/accuracy")),
    ("completion length", lambda k: k in ("completion_length/mean", "eval/completion_length")),
    ("KL / entropy", lambda k: k in ("kl", "entropy")),
]


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"plot_run.py: error: no metrics.jsonl in '{run_dir}' (give a run's output_dir)")
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a killed run
    if not rows:
        raise SystemExit(f"plot_run.py: error: '{path}' has no complete metrics line yet")
    return rows


def series(rows: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    out: dict[str, tuple[list[int], list[float]]] = {}
    for row in rows:
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)):
                xs, ys = out.setdefault(key, ([], []))
                xs.append(row.get("step", len(xs)))
                ys.append(float(value))
    return out


def plot(run_dir: Path, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = series(read_metrics(run_dir))
    panels = [(title, [k for k in sorted(data) if match(k)]) for title, match in PANELS]
    panels = [(title, keys) for title, keys in panels if keys]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels):
        for key in keys:
            xs, ys = data[key]
            ax.plot(xs, ys, marker="o" if len(xs) < 5 else None, label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path, help="a run's output_dir (holds metrics.jsonl)")
    ap.add_argument("--out", type=Path, default=None, help="PNG path (default RUN_DIR/curves.png)")
    args = ap.parse_args(argv)
    out = plot(args.run_dir, args.out or args.run_dir / "curves.png")
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
