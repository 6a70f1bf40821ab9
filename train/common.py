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
        from algos.trainer import RLTrainer

        trainer = RLTrainer(config)
        summary = trainer.train()
        # Under ZeRO-2 the DeepSpeed engine stays reachable through its hooks, and with it the process
        # group, until the interpreter exits; Accelerate's free_memory() destroys it while the interpreter
        # is alive (train.cli.close_process_group destroys the group next). ZeRO-3 engines outlive it still.
        trainer.accelerator.free_memory()
        return summary

    return main_guard(_train)
