"""Policy losses (a registry), the value loss and the loss aggregation modes.

Token tensors are (B, T) with a response ``mask`` (bool or 0/1 float). Conventions follow verl
``verl/trainer/ppo/core_algos.py`` (agg_loss, compute_policy_loss_*, compute_value_loss; see the
project's ``papers/rl-frameworks.md``). Stats are detached 0-d tensors (no ``.item()`` sync).

Every policy loss in ``POLICY_LOSSES`` has one signature,

    fn(logp, old_logp, advantages, mask, *, epsilon_low, epsilon_high, dual_clip) -> (pg, stats)

returning the per-token loss ``pg`` (B, T); ``policy_loss`` applies importance weights and the
aggregation. Aggregation takes an optional ``denominator`` so that a micro-batch's loss can be its
share of a larger (global, multi-process) batch: the trainer sums each mode's denominator over
micro-batches and processes (``aggregation_denominator``).
"""

from __future__ import annotations

import torch

from typing import Callable

from algos.advantages import masked_mean

__all__ = ["AGG_MODES", "POLICY_LOSSES", "aggregate", "aggregation_denominator", "policy_loss",
           "register_policy_loss", "value_loss"]

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


def aggregation_denominator(mask: torch.Tensor, mode: str = "token-mean", max_len=None) -> torch.Tensor:
    """What ``aggregate`` divides by for this mask: the valid-token count (token-mean), the number
    of sequences with a valid token (the seq-mean modes), or B * max_len (seq-mean-token-sum-norm).
    Sums of these over micro-batches and processes give the denominator of the whole batch."""
    if mode not in AGG_MODES:
        raise ValueError(f"unknown loss aggregation mode {mode!r}; valid modes: {', '.join(AGG_MODES)}")
    m = torch.as_tensor(mask).to(torch.float32)
    if mode == "token-mean":
        return m.sum()
    if mode == "seq-mean-token-sum-norm":
        length = m.shape[1] if max_len is None else max_len
        if length <= 0:
            raise ValueError(f"max_len must be positive, got {length}")
        return m.new_tensor(float(m.shape[0] * length))
    return (m.sum(dim=-1) > 0).to(m.dtype).sum()


def aggregate(loss: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean", max_len=None,
              denominator=None) -> torch.Tensor:
    """Reduce a (B, T) per-token loss to a scalar (verl agg_loss modes).

    token-mean:              sum(l*m) / sum(m)                       (0 if the mask is empty)
    seq-mean-token-mean:     mean_i [ sum_t(l*m)_i / sum_t m_i ]
    seq-mean-token-sum:      mean_i [ sum_t(l*m)_i ]
    seq-mean-token-sum-norm: sum(l*m) / (B * max_len), max_len defaults to T (Dr.GRPO constant).
    In the two seq-mean modes the mean runs over sequences with at least one valid token: an empty
    sequence is not a sample and is excluded (0 if every sequence is empty). ``denominator``
    replaces this batch's own (``aggregation_denominator``): the numerator is then this batch's part
    of the aggregate of a larger batch.
    """
    if mode not in AGG_MODES:
        raise ValueError(f"unknown loss aggregation mode {mode!r}; valid modes: {', '.join(AGG_MODES)}")
    if loss.dim() != 2 or tuple(mask.shape) != tuple(loss.shape):
        raise ValueError(f"expected (B, T) loss and mask of the same shape, got {tuple(loss.shape)} and {tuple(mask.shape)}")
    m = torch.as_tensor(mask, device=loss.device).to(loss.dtype)
    masked = loss * m
    if mode in ("token-mean", "seq-mean-token-sum-norm"):
        numerator = masked.sum()
    else:
        tokens_per_seq = m.sum(dim=-1)
        seq_sum = masked.sum(dim=-1)
        per_seq = _safe_div(seq_sum, tokens_per_seq) if mode == "seq-mean-token-mean" else seq_sum
        numerator = (per_seq * (tokens_per_seq > 0).to(loss.dtype)).sum()
    if denominator is None:
        denominator = aggregation_denominator(m, mode, max_len)
    return _safe_div(numerator, torch.as_tensor(denominator, dtype=loss.dtype, device=loss.device))


POLICY_LOSSES: dict[str, Callable[..., tuple[torch.Tensor, dict]]] = {}


def register_policy_loss(name: str):
    def decorator(fn):
        POLICY_LOSSES[name] = fn
        return fn
    return decorator


@register_policy_loss("vanilla")
def vanilla_policy_loss(logp, old_logp, advantages, mask, *, epsilon_low=0.2, epsilon_high=None,
                        dual_clip=None):
    """PPO's clipped surrogate per token (verl compute_policy_loss_vanilla), clip-higher and dual clip.

    ratio = exp(clamp(logp - old_logp, -20, 20));
    pg = max(-A*ratio, -A*clip(ratio, 1-eps_low, 1+eps_high)), eps_high defaults to eps_low
    (clip-higher / DAPO when eps_high > eps_low); dual clip (verl clip_ratio_c, must be > 1):
    for A < 0, pg = min(pg, -A*dual_clip).
    stats (masked means over valid tokens): clipfrac, where the clipped term was chosen
    (-A*clip(r) > -A*r strictly); approx_kl, k1 estimate of KL(pi_old || pi) = mean(old_logp - logp)
    (verl "ppo_kl"); dual_clip_frac, where A < 0 and the dual-clip bound was active (only if dual_clip).
    """
    epsilon_high = _check_clip(epsilon_low, epsilon_high, dual_clip)
    log_ratio = torch.clamp(logp - old_logp, min=-_LOG_RATIO_CLAMP, max=_LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    pg, stats = _clipped_surrogate(ratio, logp, old_logp, advantages, mask, epsilon_low, epsilon_high)
    if dual_clip is not None:
        bound = -advantages * dual_clip
        negative = advantages < 0
        stats["dual_clip_frac"] = masked_mean((negative & (pg > bound)).to(pg.dtype), mask).detach()
        pg = torch.where(negative, torch.minimum(pg, bound), pg)
    return pg, stats


@register_policy_loss("gspo")
def gspo_policy_loss(logp, old_logp, advantages, mask, *, epsilon_low=0.2, epsilon_high=None,
                     dual_clip=None):
    """GSPO: one importance ratio per sequence, clipped per sequence (Zheng et al. 2025,
    "Group Sequence Policy Optimization", eq. 5-7 and GSPO-token; verl compute_policy_loss_gspo).

    log s_i = (1/|y_i|) sum_t m_t (logp_t - old_logp_t), clamped to [-20, 20];
    s_{i,t} = sg[s_i] * pi(y_t) / sg[pi(y_t)] (value s_i, gradient of each token's log-prob scaled
    by s_i); pg = max(-A*s_{i,t}, -A*clip(s_{i,t}, 1-eps_low, 1+eps_high)). The paper's clip ranges
    are about 1e-3 of PPO's (3e-4 / 4e-4). No dual clip (refused). stats as the vanilla loss, with
    clipfrac counting tokens of clipped sequences.
    """
    epsilon_high = _check_clip(epsilon_low, epsilon_high, None)
    if dual_clip is not None:
        raise ValueError("dual_clip applies to token-level ratios; GSPO clips whole sequences")
    m = torch.as_tensor(mask, device=logp.device).to(logp.dtype)
    seq_log_ratio = _safe_div(((logp - old_logp) * m).sum(dim=-1), m.sum(dim=-1))
    seq_log_ratio = torch.clamp(seq_log_ratio, min=-_LOG_RATIO_CLAMP, max=_LOG_RATIO_CLAMP)
    ratio = torch.exp(seq_log_ratio.detach()[:, None] + logp - logp.detach())
    pg, stats = _clipped_surrogate(ratio, logp, old_logp, advantages, mask, epsilon_low, epsilon_high)
    return pg, stats


def _clipped_surrogate(ratio, logp, old_logp, advantages, mask, epsilon_low, epsilon_high):
    """pg = max(-A*r, -A*clip(r, 1-eps_low, 1+eps_high)) per token, with the clipfrac and approx_kl stats."""
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
    pg = torch.maximum(unclipped, clipped)
    stats = {
        "clipfrac": masked_mean((clipped > unclipped).to(pg.dtype), mask).detach(),
        "approx_kl": masked_mean(old_logp - logp, mask).detach(),
    }
    return pg, stats


def _check_clip(epsilon_low, epsilon_high, dual_clip) -> float:
    if epsilon_high is None:
        epsilon_high = epsilon_low
    if epsilon_low < 0 or epsilon_high < 0:
        raise ValueError(f"clip epsilons must be >= 0, got low={epsilon_low}, high={epsilon_high}")
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"dual_clip (verl clip_ratio_c) must be > 1, got {dual_clip}")
    return epsilon_high


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
    loss: str = "vanilla",
    denominator=None,
) -> tuple[torch.Tensor, dict]:
    """The policy loss ``loss`` from ``POLICY_LOSSES`` -> (scalar loss, stats).

    ``is_weights`` (B, T), detached, multiplies the per-token loss (engine-mismatch correction,
    ``algos.importance``); then loss = aggregate(pg, mask, agg_mode, max_len, denominator).
    """
    if loss not in POLICY_LOSSES:
        raise ValueError(f"unknown policy loss {loss!r}; registered: {', '.join(POLICY_LOSSES)}")
    pg, stats = POLICY_LOSSES[loss](logp, old_logp, advantages, mask, epsilon_low=epsilon_low,
                                    epsilon_high=epsilon_high, dual_clip=dual_clip)
    if is_weights is not None:
        pg = pg * is_weights
    return aggregate(pg, mask, agg_mode, max_len, denominator), stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range=0.5,
    agg_mode: str = "token-mean",
    max_len=None,
    denominator=None,
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
    loss = 0.5 * aggregate(per_token, mask, agg_mode, max_len, denominator)
    return loss, {"vf_clipfrac": frac.detach()}
