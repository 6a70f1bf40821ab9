"""Reward functions for RL post-training: answer checking, built-in rewards, registry, stack.

Quick use::

    from rewards import RewardStack
    stack = RewardStack("accuracy,format", weights=[1.0, 0.1])
    out = stack(prompts, completions, answer=answers)  # out.total: (B,) float32
"""

from .outcome import accuracy, format_reward
from .overlong import overlong_penalty, soft_overlong_punishment
from .registry import RewardConfigError, register_reward, resolve_reward
from .stack import RewardError, RewardOutput, RewardStack, component_means
from .verify import extract_boxed, is_correct

__all__ = [
    "RewardStack",
    "RewardOutput",
    "RewardError",
    "RewardConfigError",
    "resolve_reward",
    "register_reward",
    "component_means",
    "accuracy",
    "format_reward",
    "overlong_penalty",
    "soft_overlong_punishment",
    "is_correct",
    "extract_boxed",
]
