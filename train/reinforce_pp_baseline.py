"""REINFORCE++-baseline: group-mean baseline whitened over the batch, KL (k3) in the loss.

    accelerate launch train/reinforce_pp_baseline.py --reward accuracy
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from train.common import run  # noqa: E402

if __name__ == "__main__":
    run("reinforce_pp_baseline", __doc__)
