"""REINFORCE++: discounted returns whitened over the batch, KL (k1) in the reward.
The group-baseline variant is train/reinforce_pp_baseline.py.

    accelerate launch train/reinforce_pp.py --reward accuracy
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from train.common import run  # noqa: E402

if __name__ == "__main__":
    run("reinforce_pp", __doc__)
