"""PPO: a critic initialised from the policy, GAE advantages, KL (k1) in the reward.

    accelerate launch train/ppo.py --reward accuracy
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from train.common import run  # noqa: E402

if __name__ == "__main__":
    run("ppo", __doc__)
