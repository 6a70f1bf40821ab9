"""DAPO's soft overlong punishment: a length penalty that ramps up over the last ``buffer_length``
tokens before the generation limit.

Source: Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale", eq. 13
(verl ``reward_manager/dapo.py``: overlong_buffer len / penalty_factor; TRL
``trl.rewards.get_soft_overlong_punishment``). With L_max the generation limit, L_cache the buffer
and |y| the completion's token count:

    R(y) = 0                                  if |y| <= L_max - L_cache
         = ((L_max - L_cache) - |y|) / L_cache  if L_max - L_cache < |y| <= L_max
         = -1                                 if |y| > L_max

times ``penalty_factor``. The trainer binds L_max = --max_completion_length and L_cache =
--overlong_buffer_length when ``--reward`` names ``overlong``.
"""
from __future__ import annotations

from typing import Callable

from rewards.registry import RewardConfigError, register_reward


def overlong_penalty(length: int, max_length: int, buffer_length: int, penalty_factor: float = 1.0) -> float:
    """R(y) for a completion of ``length`` tokens (formula above)."""
    start = max_length - buffer_length
    if length <= start:
        return 0.0
    if length <= max_length:
        return penalty_factor * (start - length) / buffer_length
    return -penalty_factor


def soft_overlong_punishment(max_length: int, buffer_length: int, penalty_factor: float = 1.0) -> Callable:
    """The reward function (TRL signature) for these settings, named ``overlong``."""
    if buffer_length < 1 or buffer_length > max_length:
        raise RewardConfigError(f"overlong reward: buffer length {buffer_length} must be in "
                                f"[1, max_completion_length={max_length}]; set --overlong_buffer_length")

    def overlong(prompts, completions, completion_ids=None, **kwargs) -> list[float]:
        if completion_ids is None:
            raise RewardConfigError("the overlong reward needs completion_ids (token counts)")
        return [overlong_penalty(len(ids), max_length, buffer_length, penalty_factor) for ids in completion_ids]

    return overlong


@register_reward("overlong")
def overlong(prompts, completions, completion_ids=None, max_completion_length=None,
             overlong_buffer_length=None, overlong_penalty_factor=1.0, **kwargs) -> list[float]:
    """Registered form: the trainer binds the lengths from its config; called directly it needs
    ``max_completion_length`` and ``overlong_buffer_length`` keywords."""
    if max_completion_length is None or overlong_buffer_length is None:
        raise RewardConfigError("the overlong reward needs max_completion_length and overlong_buffer_length "
                                "(the trainer passes --max_completion_length and --overlong_buffer_length)")
    fn = soft_overlong_punishment(int(max_completion_length), int(overlong_buffer_length),
                                  float(overlong_penalty_factor))
    return fn(prompts, completions, completion_ids)
