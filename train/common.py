"""What every RL entry point does: parse the config, build the trainer, train."""
from __future__ import annotations

import os
import sys

# Entry points run as scripts (`accelerate launch train/grpo.py`): make the project importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from train.cli import main_guard, parse_config  # noqa: E402


def run(algorithm: str, description: str, argv=None):
    prog = f"{algorithm}.py"
    config = parse_config(argv, prog=prog, description=description, fixed={"algorithm": algorithm})

    def _train():
        from algos.deepspeed_setup import release_engines
        from algos.trainer import RLTrainer

        trainer = RLTrainer(config)
        summary = trainer.train()
        # DeepSpeed engines would keep the process group alive until the interpreter exits;
        # train.cli.close_process_group destroys the group next.
        release_engines(trainer.accelerator)
        return summary

    return main_guard(_train)
