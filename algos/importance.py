"""Engine-mismatch correction: truncated importance sampling between the rollout engine and the trainer.

A rollout engine (vLLM) samples from pi_engine, whose log-probs differ from the trainer's forward pass
pi_train (other kernels, bf16 weights). With Delta_t = log pi_train(y_t) - log pi_engine(y_t) on the
response tokens, the policy loss of each token is multiplied by a detached weight w:

    token_truncate     w_t = min(exp(Delta_t), C)
    token_mask         w_t = exp(Delta_t) if exp(Delta_t) <= C else 0
    sequence_truncate  w_t = min(exp(sum_s Delta_s), C)                for every token t of the sequence
    sequence_mask      w_t = exp(sum_s Delta_s) if that is <= C else 0

C is ``--vllm_importance_sampling_cap``. Sources: Yao et al., "Your Efficient RL Framework Secretly
Brings You Off-Policy RL Training" (2025, truncated IS); TRL ``trl/trainer/grpo_trainer.py``
(``vllm_importance_sampling_mode``; the four modes and the product of token ratios for a sequence).

Mismatch statistics, masked means over response tokens (tokens were drawn from pi_engine):
    abs_logprob_diff  mean |Delta_t|
    kl                k3 estimate of KL(pi_engine || pi_train): mean(exp(Delta_t) - 1 - Delta_t)
    capped_fraction   share of tokens whose weight was truncated to C (truncate modes)
    masked_fraction   share of tokens whose weight was set to 0 (mask modes)
"""
from __future__ import annotations

from typing import Callable

import torch

from algos.advantages import masked_mean

__all__ = ["IS_MODES", "engine_is_weights", "mismatch_stats"]

_LOG_RATIO_CLAMP = 20.0


def _truncate(ratio: torch.Tensor, cap: float) -> tuple[torch.Tensor, torch.Tensor]:
    over = ratio > cap
    return ratio.clamp(max=cap), over


def _mask(ratio: torch.Tensor, cap: float) -> tuple[torch.Tensor, torch.Tensor]:
    over = ratio > cap
    return ratio.masked_fill(over, 0.0), over


def _token(delta: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return delta


def _sequence(delta: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (delta * mask).sum(dim=-1, keepdim=True).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP).expand_as(delta)


# mode -> (log-ratio per token from Delta, how the cap applies)
IS_MODES: dict[str, tuple[Callable, Callable]] = {
    "token_truncate": (_token, _truncate),
    "token_mask": (_token, _mask),
    "sequence_truncate": (_sequence, _truncate),
    "sequence_mask": (_sequence, _mask),
}


def engine_is_weights(train_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor,
                      mode: str = "token_truncate", cap: float = 3.0) -> tuple[torch.Tensor, dict]:
    """Detached (B, T) weights w for the per-token policy loss (see the module docstring) and the
    mismatch statistics as detached 0-d tensors. Positions outside ``mask`` get weight 0."""
    if mode not in IS_MODES:
        raise ValueError(f"unknown importance sampling mode {mode!r}; choose one of {', '.join(IS_MODES)}")
    if not cap > 0:
        raise ValueError(f"the importance sampling cap must be > 0, got {cap}")
    m = mask.to(train_logp.dtype)
    delta = ((train_logp - engine_logp).detach() * m).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    to_log_ratio, apply_cap = IS_MODES[mode]
    weights, over = apply_cap(torch.exp(to_log_ratio(delta, m)), cap)
    stats = mismatch_stats(delta, m)
    hit = masked_mean(over.to(m.dtype), m).detach()
    zero = torch.zeros((), dtype=m.dtype, device=m.device)
    truncating = mode.endswith("truncate")
    stats.update({"capped_fraction": hit if truncating else zero, "masked_fraction": zero if truncating else hit})
    return weights * m, stats


def mismatch_stats(delta: torch.Tensor, mask: torch.Tensor) -> dict:
    """mean |Delta| and the k3 KL(pi_engine || pi_train) over the response tokens."""
    return {"abs_logprob_diff": masked_mean(delta.abs(), mask).detach(),
            "kl": masked_mean(torch.expm1(delta) - delta, mask).detach()}
