"""Advantage estimators for RL post-training (pure tensor math, no model code).

Shapes: token tensors are ``(B, T)``; ``mask`` is the ``(B, T)`` response mask (bool or 0/1 float);
``group_ids`` is a ``(B,)`` integer tensor (groups may have different sizes and need not be
contiguous). An outcome reward sits on the last valid response token of ``token_rewards``.

Numerical conventions follow verl ``verl/trainer/ppo/core_algos.py`` (see the project's
``papers/rl-frameworks.md``): whitening uses the unbiased (Bessel-corrected) variance over valid
tokens plus 1e-8; group statistics use ``torch.std`` (unbiased). A group of size 1 has nothing to
compare with: it is measured against the rest of the batch (``group_mean_std``), where verl takes
mean 0 and std 1 and so hands a singleton its raw score as advantage.

Batch-wide statistics (whitening, the singleton baseline, ``scale="batch"``) take an optional
``reduce``: a function summing a tensor over processes (the trainer passes an all-reduce), so that
with several processes they are the statistics of the global batch, not of each process's share.

Sequence score convention (all group estimators): ``s_i = sum_t r_{i,t} * mask_{i,t}``, so rewards
sitting on padded positions are ignored.
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = [
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "group_mean_std",
    "gae",
    "grpo",
    "reinforce_pp",
    "reinforce_pp_baseline",
    "rloo",
    "ADVANTAGE_ESTIMATORS",
    "ESTIMATOR_FOR_ALGORITHM",
    "register_advantage",
]

Reduce = Callable[[torch.Tensor], torch.Tensor]


def _local(x: torch.Tensor) -> torch.Tensor:
    return x


# --------------------------------------------------------------------------- helpers


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least float32 for the arithmetic (bf16/fp16 inputs are upcast)."""
    return torch.promote_types(dtype, torch.float32)


def _float_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Bool or 0/1 mask as a float tensor with ``like``'s dtype and device."""
    return torch.as_tensor(mask, device=like.device).to(like.dtype)


def _check_same_shape(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"shape mismatch: {shapes}")
    if len(next(iter(shapes.values()))) != 2:
        raise ValueError(f"expected (B, T) tensors, got {shapes}")


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den, and 0 where den == 0 (no NaN, no NaN gradient)."""
    nonzero = den != 0
    return torch.where(nonzero, num / torch.where(nonzero, den, torch.ones_like(den)), torch.zeros_like(num))


def _group_index(group_ids, batch_size: int, device) -> tuple[torch.Tensor, int]:
    """Map arbitrary integer group ids to compact indices 0..G-1; returns (inverse, G)."""
    ids = torch.as_tensor(group_ids, device=device)
    if ids.dim() != 1 or ids.shape[0] != batch_size:
        raise ValueError(f"group_ids must have shape ({batch_size},), got {tuple(ids.shape)}")
    uniq, inverse = torch.unique(ids, return_inverse=True)
    return inverse, uniq.numel()


def _group_sum(values: torch.Tensor, inverse: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Per-group sum of a (B,) tensor via index_add (vectorised scatter)."""
    return torch.zeros(n_groups, dtype=values.dtype, device=values.device).index_add_(0, inverse, values)


def _sequence_scores(token_rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """s_i = sum_t r_{i,t} * mask_{i,t}, in float64 for the (tiny, (B,)-sized) group statistics."""
    m = _float_mask(mask, token_rewards)
    return (token_rewards * m).sum(dim=-1).to(torch.float64)


# --------------------------------------------------------------------------- masked statistics


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is 1: sum(x*m) / sum(m).

    verl ``masked_mean`` convention, except that an empty mask gives 0 instead of dividing by
    ``sum(m) + 1e-8`` (identical for any non-empty 0/1 mask). ``dim=None`` reduces over everything.
    """
    m = _float_mask(mask, x)
    if dim is None:
        return _safe_div((x * m).sum(), m.sum())
    return _safe_div((x * m).sum(dim=dim), m.sum(dim=dim))


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over valid positions (all dims): mean((x - mean)^2) * n/(n-1) if unbiased.

    verl ``masked_var`` convention (Bessel correction n/(n-1) over the n valid tokens). Where verl
    raises for n <= 1, this returns 0 (a single valid token has no spread; whitening then maps it
    to 0 instead of crashing a training step).
    """
    m = _float_mask(mask, x)
    mean = masked_mean(x, m)
    var = masked_mean((x - mean) ** 2, m)
    if unbiased:
        n = m.sum()
        var = torch.where(n > 1, var * n / torch.clamp(n - 1, min=1), torch.zeros_like(var))
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8,
                  reduce: Reduce | None = None) -> torch.Tensor:
    """Whiten over valid tokens: (x - mean) * rsqrt(var + eps), unbiased var (verl ``masked_whiten``).

    With ``shift_mean=False`` the mean is added back: x_white + mean. Statistics are global over all
    valid tokens of the batch (of every process, with ``reduce``); masked positions are transformed
    too (callers multiply by the mask). One valid token in all: var 0 (verl raises).
    """
    if reduce is None:
        mean = masked_mean(x, mask)
        var = masked_var(x, mask, unbiased=True)
    else:
        m = _float_mask(mask, x)
        n = reduce(m.sum())
        mean = _safe_div(reduce((x * m).sum()), n)
        var = _safe_div(reduce(((x - mean) ** 2 * m).sum()), n)
        var = torch.where(n > 1, var * n / torch.clamp(n - 1, min=1), torch.zeros_like(var))
    white = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        white = white + mean
    return white


def _valid_weights(scores: torch.Tensor, valid) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores with invalid rows set to 0, 0/1 weights): rows with ``valid`` False count nowhere."""
    if valid is None:
        return scores, torch.ones_like(scores)
    v = torch.as_tensor(valid, device=scores.device).bool()
    return torch.where(v, scores, torch.zeros_like(scores)), v.to(scores.dtype)


@torch.no_grad()
def group_mean_std(scores: torch.Tensor, group_ids, reduce: Reduce | None = None, valid=None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample (mean_g, std_g, n_g) of the group each score belongs to, shapes (B,).

    mean_g = sum_g s / n_g; std_g = sqrt(sum_g (s - mean_g)^2 / (n_g - 1)) (unbiased, as torch.std).
    A group of size 1 (common with EAGER rollouts) is compared with the rest of the batch: mean_g is
    the mean of the *other* scores of the batch (leave-one-out, so the baseline does not depend on
    the sample and the gradient stays unbiased) and std_g the unbiased std of all the batch's scores
    (1 if it is 0). Alone in the batch, mean_g = s (advantage 0) and std_g = 1. verl instead uses
    mean 0 and std 1, which hands a singleton its raw score: a formatted wrong answer is reinforced.
    ``valid`` (B,) bool: rows left out of every statistic and count (TRL's unscorable completions,
    whose rewards were all None). ``reduce`` sums over processes for the batch statistics.
    Vectorised with index_add.
    """
    reduce = reduce or _local
    scores, w = _valid_weights(scores, valid)
    inverse, n_groups = _group_index(group_ids, scores.shape[0], scores.device)
    counts = _group_sum(w, inverse, n_groups)
    mean_g = _group_sum(scores, inverse, n_groups) / counts.clamp(min=1)
    sq_dev = _group_sum((scores - mean_g[inverse]) ** 2 * w, inverse, n_groups)
    std_g = torch.sqrt(sq_dev / (counts - 1).clamp(min=1))
    mean, std, n = mean_g[inverse], std_g[inverse], counts[inverse]
    single = n == 1
    if bool(reduce(single.any().to(scores.dtype)) > 0):  # every process takes part in the reduction
        total, count = reduce(scores.sum()), reduce(w.sum())
        batch_mean = total / count.clamp(min=1)
        batch_var = reduce(((scores - batch_mean) ** 2 * w).sum()) / (count - 1).clamp(min=1)
        batch_std = torch.where(batch_var > 0, batch_var.sqrt(), torch.ones_like(batch_var))
        others = torch.where(count > 1, (total - scores) / (count - 1).clamp(min=1), scores)
        mean = torch.where(single, others, mean)
        std = torch.where(single, torch.where(count > 1, batch_std, torch.ones_like(batch_std)), std)
    return mean, std, n


def batch_std(scores: torch.Tensor, reduce: Reduce | None = None, valid=None) -> torch.Tensor:
    """Unbiased std of all (``valid``) scores of the batch (every process's with ``reduce``): TRL's
    ``scale_rewards="batch"``."""
    reduce = reduce or _local
    scores, w = _valid_weights(scores, valid)
    count = reduce(w.sum())
    mean = reduce(scores.sum()) / count.clamp(min=1)
    return torch.sqrt(reduce(((scores - mean) ** 2 * w).sum()) / (count - 1).clamp(min=1))


# --------------------------------------------------------------------------- estimators


@torch.no_grad()
def gae(
    token_rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 1.0,
    reduce: Reduce | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised Advantage Estimation -> (advantages, returns), both (B, T).

    delta_t = r_t + gamma*V_{t+1} - V_t;  A_t = delta_t + gamma*lam*A_{t+1}, computed backwards.
    Masked positions pass the next value and the running A through unchanged
    (nextV = V_t*m_t + (1-m_t)*nextV; A = A_new*m_t + (1-m_t)*A), so padding and
    observation tokens neither read nor leak values. returns = A + V (before whitening);
    advantages = masked_whiten(A) over valid tokens; both times mask.
    Source: verl core_algos compute_gae_advantage_return convention.
    """
    _check_same_shape(token_rewards=token_rewards, values=values, mask=mask)
    out_dtype = token_rewards.dtype
    dt = _compute_dtype(out_dtype)
    r = token_rewards.to(dt)
    v = values.to(dt)
    m = _float_mask(mask, r)

    batch, length = r.shape
    next_value = torch.zeros(batch, dtype=dt, device=r.device)
    running = torch.zeros(batch, dtype=dt, device=r.device)
    adv = torch.zeros_like(r)
    for t in range(length - 1, -1, -1):
        m_t = m[:, t]
        delta = r[:, t] + gamma * next_value - v[:, t]
        new_running = delta + gamma * lam * running
        next_value = v[:, t] * m_t + (1.0 - m_t) * next_value
        running = new_running * m_t + (1.0 - m_t) * running
        adv[:, t] = running

    returns = (adv + v) * m
    adv = masked_whiten(adv, m, reduce=reduce) * m
    return adv.to(out_dtype), returns.to(out_dtype)


@torch.no_grad()
def grpo(
    token_rewards: torch.Tensor,
    mask: torch.Tensor,
    group_ids,
    scale: str = "group",
    eps: float = 1e-6,
    reduce: Reduce | None = None,
    valid=None,
) -> torch.Tensor:
    """GRPO outcome advantage, broadcast over the mask, (B, T).

    s_i = sum_t r_{i,t}*m_{i,t};  A_i = (s_i - mean_g) / (std + eps). ``scale`` (TRL's
    ``scale_rewards``): "group" divides by the group's unbiased std_g (verl, GRPO), "batch" by the
    std of all scores of the batch (TRL; a group that differs only in a small reward term keeps a
    small advantage), "none" not at all (Dr.GRPO: A_i = s_i - mean_g). Size-1 groups: see
    ``group_mean_std``. Rows with ``valid`` False (every reward None) are left out of the
    statistics and get A = 0 (TRL). Source: verl core_algos compute_grpo_outcome_advantage
    (epsilon=1e-6), TRL ``GRPOTrainer`` (scale_rewards, unscorable completions).
    """
    _check_same_shape(token_rewards=token_rewards, mask=mask)
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"unknown GRPO reward scaling {scale!r}; choose group, batch or none")
    scores = _sequence_scores(token_rewards, mask)
    mean, std, _ = group_mean_std(scores, group_ids, reduce, valid)
    adv = scores - mean
    if scale == "group":
        adv = adv / (std + eps)
    elif scale == "batch":
        adv = adv / (batch_std(scores, reduce, valid) + eps)
    if valid is not None:
        adv = torch.where(torch.as_tensor(valid, device=adv.device).bool(), adv, torch.zeros_like(adv))
    return adv.to(token_rewards.dtype).unsqueeze(-1) * _float_mask(mask, token_rewards)


@torch.no_grad()
def reinforce_pp(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
                 reduce: Reduce | None = None) -> torch.Tensor:
    """REINFORCE++ advantage: discounted return-to-go, whitened over the batch, (B, T).

    Backwards: running = r_t + gamma*running; G_t = running; running *= m_t (the return is reset
    at padded positions, so nothing after the last valid token flows back into the response).
    A = masked_whiten(G, mask) over all valid tokens of the batch, times mask. Token rewards are
    expected to already contain -beta*KL_t (KL in the reward).
    Source: verl core_algos compute_reinforce_plus_plus_outcome_advantage convention.
    """
    _check_same_shape(token_rewards=token_rewards, mask=mask)
    out_dtype = token_rewards.dtype
    r = token_rewards.to(_compute_dtype(out_dtype))
    m = _float_mask(mask, r)

    running = torch.zeros(r.shape[0], dtype=r.dtype, device=r.device)
    returns = torch.zeros_like(r)
    for t in range(r.shape[1] - 1, -1, -1):
        running = r[:, t] + gamma * running
        returns[:, t] = running
        running = running * m[:, t]

    return (masked_whiten(returns, m, reduce=reduce) * m).to(out_dtype)


@torch.no_grad()
def reinforce_pp_baseline(token_rewards: torch.Tensor, mask: torch.Tensor, group_ids,
                          reduce: Reduce | None = None, valid=None) -> torch.Tensor:
    """REINFORCE++-baseline advantage, (B, T).

    A_i = s_i - mean_g (size-1 group: see ``group_mean_std``), tiled over the tokens, then
    masked_whiten over all valid tokens of the batch, times mask (KL belongs in the loss here).
    Rows with ``valid`` False are left out of the statistics and get 0, as in ``grpo``.
    Source: verl core_algos compute_reinforce_plus_plus_baseline_outcome_advantage convention.
    """
    _check_same_shape(token_rewards=token_rewards, mask=mask)
    scores = _sequence_scores(token_rewards, mask)
    mean, _, _ = group_mean_std(scores, group_ids, reduce, valid)
    dt = _compute_dtype(token_rewards.dtype)
    m = _float_mask(mask, token_rewards.to(dt))
    if valid is not None:
        m = m * torch.as_tensor(valid, device=m.device).to(dt).unsqueeze(-1)
    tiled = (scores - mean).to(dt).unsqueeze(-1) * m
    return (masked_whiten(tiled, m, reduce=reduce) * m).to(token_rewards.dtype)


@torch.no_grad()
def rloo(token_rewards: torch.Tensor, mask: torch.Tensor, group_ids) -> torch.Tensor:
    """RLOO (leave-one-out) advantage, broadcast over the mask, (B, T).

    A_i = s_i - (sum_g s - s_i) / (n_g - 1); a group of size 1 has no baseline and gets A_i = 0.
    Source: RLOO (Ahmadian et al. 2024) as in verl compute_rloo_outcome_advantage, except verl keeps
    s_i unchanged for size-1 groups; here they get 0 advantage (no leave-one-out baseline exists).
    """
    _check_same_shape(token_rewards=token_rewards, mask=mask)
    scores = _sequence_scores(token_rewards, mask)
    inverse, n_groups = _group_index(group_ids, scores.shape[0], scores.device)
    counts = torch.bincount(inverse, minlength=n_groups).to(scores.dtype)[inverse]
    sums = _group_sum(scores, inverse, n_groups)[inverse]
    baseline = (sums - scores) / (counts - 1).clamp(min=1)
    adv = torch.where(counts > 1, scores - baseline, torch.zeros_like(scores))
    return adv.to(token_rewards.dtype).unsqueeze(-1) * _float_mask(mask, token_rewards)


# --------------------------------------------------------------------------- the registry
# One signature for every estimator, as verl's ``core_algos`` registry:
#   fn(token_rewards, mask, *, group_ids, values, gamma, lam, scale, reduce, valid) -> (advantages, returns)
# (``returns`` is None except for GAE, whose returns train the critic). The trainer looks the
# estimator up by name and passes everything; each takes what it needs.

ADVANTAGE_ESTIMATORS: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor | None]]] = {}

# Which estimator each algorithm uses.
ESTIMATOR_FOR_ALGORITHM = {"ppo": "gae", "grpo": "grpo", "reinforce_pp": "reinforce_pp",
                           "reinforce_pp_baseline": "reinforce_pp_baseline"}


def register_advantage(name: str):
    def decorator(fn):
        ADVANTAGE_ESTIMATORS[name] = fn
        return fn
    return decorator


@register_advantage("gae")
def _gae(token_rewards, mask, *, values, gamma=1.0, lam=1.0, reduce=None, **_):
    return gae(token_rewards, values, mask, gamma, lam, reduce=reduce)


@register_advantage("grpo")
def _grpo(token_rewards, mask, *, group_ids, scale="group", reduce=None, valid=None, **_):
    return grpo(token_rewards, mask, group_ids, scale=scale, reduce=reduce, valid=valid), None


@register_advantage("reinforce_pp")
def _reinforce_pp(token_rewards, mask, *, gamma=1.0, reduce=None, **_):
    return reinforce_pp(token_rewards, mask, gamma, reduce=reduce), None


@register_advantage("reinforce_pp_baseline")
def _reinforce_pp_baseline(token_rewards, mask, *, group_ids, reduce=None, valid=None, **_):
    return reinforce_pp_baseline(token_rewards, mask, group_ids, reduce=reduce, valid=valid), None


@register_advantage("rloo")
def _rloo(token_rewards, mask, *, group_ids, **_):
    return rloo(token_rewards, mask, group_ids), None
