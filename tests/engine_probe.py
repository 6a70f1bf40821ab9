"""Run under `accelerate launch --config_file configs/accelerate/zero{2,3}.yaml` by
tests/test_deepspeed_cpu.py: an RL entry point's ``run`` (what train/<algorithm>.py calls), then how many
DeepSpeed engines are still alive after it left the process group. None may be: a live engine keeps its
process group (and gloo's threads) until the interpreter's finalization, where they can abort the process.

    python tests/engine_probe.py ALGORITHM [train/<algorithm>.py flags; --output_dir required]

Each process writes ``live_engines_rank<R>.json`` into the output dir.
"""
import gc
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from train.common import run  # noqa: E402


def live_engines() -> int:
    from deepspeed.runtime.engine import DeepSpeedEngine

    gc.collect()
    return sum(isinstance(o, DeepSpeedEngine) for o in gc.get_objects())


if __name__ == "__main__":
    algorithm, argv = sys.argv[1], sys.argv[2:]
    run(algorithm, f"{algorithm} under the engine probe", argv)
    out = Path(argv[argv.index("--output_dir") + 1])
    rank = int(os.environ.get("RANK", "0"))
    (out / f"live_engines_rank{rank}.json").write_text(json.dumps({"live_engines": live_engines()}))
