"""PPO-style policy and value losses and the loss aggregation modes.

Token tensors are (B, T) with a response ``mask`` (bool or 0/1 float). Conventions follow verl
``verl/trainer/ppo/core_algos.py`` (agg_loss, compute_policy_loss, compute_value_loss); see
``/work/shared/papers/rl-frameworks.md``. Stats are detached 0-d tensors (no ``.item()`` sync).
"""

from __future__ import annotations

import torch

from algos.advantages import masked_mean

__all__ = ["AGG_MODES", "aggregate", "policy_loss", "value_loss"]

AGG_MODES: tuple[str, ...] = (
    "token-mean",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
)

_LOG_RATIO_CLAMP = 20.0


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den, and 0 where den == 0 (no NaN, no NaN gradient)."""
    nonzero = den != 0
    return torch.where(nonzero, num / torch.where(nonzero, den, torch.ones_like(den)), torch.zeros_like(num))


def aggregate(loss: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean", max_len=None) -> torch.Tensor:
    """Reduce a (B, T) per-token loss to a scalar (verl agg_loss modes).

    token-mean:              sum(l*m) / sum(m)                       (0 if the mask is empty)
    seq-mean-token-mean:     mean_i [ sum_t(l*m)_i / sum_t m_i ]
    seq-mean-token-sum:      mean_i [ sum_t(l*m)_i ]
    seq-mean-token-sum-norm: sum(l*m) / (B * max_len), max_len defaults to T (Dr.GRPO constant).
    In the two seq-mean modes the mean runs over sequences with at least one valid token: an empty
    sequence is not a sample and is excluded (0 if every sequence is empty).
    """
    if mode not in AGG_MODES:
        raise ValueError(f"unknown loss aggregation mode {mode!r}; valid modes: {', '.join(AGG_MODES)}")
    if loss.dim() != 2 or tuple(mask.shape) != tuple(loss.shape):
        raise ValueError(f"expected (B, T) loss and mask of the same shape, got {tuple(loss.shape)} and {tuple(mask.shape)}")
    m = torch.as_tensor(mask, device=loss.device).to(loss.dtype)
    masked = loss * m
    if mode == "token-mean":
        return _safe_div(masked.sum(), m.sum())
    if mode == "seq-mean-token-sum-norm":
        length = loss.shape[1] if max_len is None else max_len
        if length <= 0:
            raise ValueError(f"max_len must be positive, got {length}")
        return masked.sum() / (loss.shape[0] * length)

    tokens_per_seq = m.sum(dim=-1)
    seq_sum = masked.sum(dim=-1)
    if mode == "seq-mean-token-mean":
        per_seq = _safe_div(seq_sum, tokens_per_seq)
    else:  # seq-mean-token-sum
        per_seq = seq_sum
    present = (tokens_per_seq > 0).to(loss.dtype)
    return _safe_div((per_seq * present).sum(), present.sum())


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    epsilon_low: float = 0.2,
    epsilon_high=None,
    dual_clip=None,
    agg_mode: str = "token-mean",
    max_len=None,
    is_weights=None,
) -> tuple[torch.Tensor, dict]:
    """PPO clipped surrogate (verl compute_policy_loss convention) -> (loss, stats).

    ratio = exp(clamp(logp - old_logp, -20, 20));
    pg = max(-A*ratio, -A*clip(ratio, 1-eps_low, 1+eps_high)), eps_high defaults to eps_low
    (clip-higher / DAPO when eps_high > eps_low); dual clip (verl clip_ratio_c, must be > 1):
    for A < 0, pg = min(pg, -A*dual_clip). ``is_weights`` (B, T), detached, multiplies pg per token
    (engine-mismatch correction, ``algos.importance``). loss = aggregate(pg, mask, agg_mode, max_len).
    stats (detached 0-d tensors, masked means over valid tokens):
      clipfrac       fraction where the clipped term was chosen (-A*clip(r) > -A*r strictly);
      approx_kl      k1 estimate of KL(pi_old || pi): mean(old_logp - logp) (verl "ppo_kl");
      dual_clip_frac fraction where A < 0 and the dual-clip bound was active (only if dual_clip).
    """
    if epsilon_high is None:
        epsilon_high = epsilon_low
    if epsilon_low < 0 or epsilon_high < 0:
        raise ValueError(f"clip epsilons must be >= 0, got low={epsilon_low}, high={epsilon_high}")
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"dual_clip (verl clip_ratio_c) must be > 1, got {dual_clip}")

    log_ratio = torch.clamp(logp - old_logp, min=-_LOG_RATIO_CLAMP, max=_LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
    pg = torch.maximum(unclipped, clipped)

    stats = {
        "clipfrac": masked_mean((clipped > unclipped).to(pg.dtype), mask).detach(),
        "approx_kl": masked_mean(old_logp - logp, mask).detach(),
    }
    if dual_clip is not None:
        bound = -advantages * dual_clip
        negative = advantages < 0
        stats["dual_clip_frac"] = masked_mean((negative & (pg > bound)).to(pg.dtype), mask).detach()
        pg = torch.where(negative, torch.minimum(pg, bound), pg)
    if is_weights is not None:
        pg = pg * is_weights

    return aggregate(pg, mask, agg_mode, max_len), stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range=0.5,
    agg_mode: str = "token-mean",
    max_len=None,
) -> tuple[torch.Tensor, dict]:
    """Clipped value loss (verl compute_value_loss convention) -> (loss, stats).

    v_clip = old + clamp(v - old, -c, c);  loss = 0.5 * aggregate(max((v - R)^2, (v_clip - R)^2)).
    ``clip_range=None`` disables clipping. stats: vf_clipfrac = fraction of valid tokens where the
    clipped term is strictly larger (detached 0-d tensor).
    """
    unclipped = (values - returns) ** 2
    if clip_range is None:
        per_token = unclipped
        frac = torch.zeros((), dtype=values.dtype, device=values.device)
    else:
        v_clip = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
        clipped = (v_clip - returns) ** 2
        per_token = torch.maximum(unclipped, clipped)
        frac = masked_mean((clipped > unclipped).to(values.dtype), mask)
    loss = 0.5 * aggregate(per_token, mask, agg_mode, max_len)
    return loss, {"vf_clipfrac": frac.detach()}
