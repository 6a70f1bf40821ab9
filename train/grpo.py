"""GRPO: group-relative advantages, KL (beta, default 0) in the loss.

    accelerate launch train/grpo.py --reward repro      # the defaults: thinking model and task, vLLM, 12 steps
    accelerate launch train/grpo.py --config configs/quickstart_grpo.yaml
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from train.common import run  # noqa: E402

if __name__ == "__main__":
    run("grpo", __doc__)
