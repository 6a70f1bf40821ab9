"""REPRO process-reward advantages: normalise the step rewards, then take the return-to-go.

Source: Liu et al., "Rectifying LLM Thought from Lens of Optimization", arXiv 2512.01925. The
final advantage is

    A_t = A_outcome,t + alpha * Ã_t,      Ã_t = sum_{s >= t} gamma^(s-t) * r̃_s   (gamma = 1)

where r̃ are the process rewards (``rewards.repro``: one per scored segment, on the segment's last
token) normalised in the way that matches the algorithm:

    GRPO, PPO              "group"         r̃ = (r - mean_g) / (std_g + 1e-6)
    REINFORCE++            "batch_whiten"  r̃ = (r - mean) * rsqrt(var + 1e-8)   (verl masked_whiten)
    REINFORCE++-baseline   "group_mean"    r̃ = r - mean_g

Statistics run over the *rewarded positions* only (``reward_mask``): mean_g/std_g over every
rewarded token of every rollout in prompt group g (std unbiased; a group with a single rewarded
position gets std 1). Unlike the reference code, no zero is added per rollout for its baseline slot.
For PPO the normalised term is folded into the token rewards that GAE consumes (the trainer's job);
here ``repro_advantage`` gives the return-to-go form used by GRPO / REINFORCE++.

All functions are pure and vectorised over (B, T) tensors.
"""
from __future__ import annotations

import torch

from algos.advantages import masked_whiten

__all__ = [
    "ALGO_TO_MODE",
    "MODES",
    "normalize_process_rewards",
    "return_to_go",
    "repro_advantage",
]

MODES = ("group", "batch_whiten", "group_mean")

ALGO_TO_MODE = {
    "grpo": "group",
    "ppo": "group",
    "reinforce_pp": "batch_whiten",
    "reinforce_pp_baseline": "group_mean",
}


def _check(token_rewards: torch.Tensor, *masks: torch.Tensor) -> None:
    if token_rewards.dim() != 2:
        raise ValueError(f"expected (B, T) token rewards, got shape {tuple(token_rewards.shape)}")
    for m in masks:
        if tuple(m.shape) != tuple(token_rewards.shape):
            raise ValueError(f"mask shape {tuple(m.shape)} != rewards shape {tuple(token_rewards.shape)}")


def normalize_process_rewards(
    token_rewards: torch.Tensor,
    reward_mask: torch.Tensor,
    group_ids: torch.Tensor,
    mode: str = "group",
    eps: float = 1e-6,
) -> torch.Tensor:
    """Normalise process rewards over rewarded positions; 0 elsewhere. Returns float32 (B, T).

    mode "group":        r̃ = (r - mean_g) / (std_g + eps), mean/std over all rewarded positions of
                         the rollouts with the same ``group_ids`` (unbiased std; n_g = 1 -> std 1).
    mode "batch_whiten": r̃ = (r - mean) * rsqrt(var + 1e-8) over all rewarded positions of the batch
                         (``algos.advantages.masked_whiten``, verl convention; n = 1 -> 0).
    mode "group_mean":   r̃ = r - mean_g.
    """
    _check(token_rewards, reward_mask)
    if mode not in MODES:
        raise ValueError(f"unknown process-reward normalisation {mode!r}; choose one of {MODES}")
    x = token_rewards.to(torch.float32)
    m = reward_mask.to(torch.bool)
    mf = m.to(x.dtype)
    if mode == "batch_whiten":
        return masked_whiten(x, mf) * mf

    ids = torch.as_tensor(group_ids, device=x.device)
    if ids.dim() != 1 or ids.shape[0] != x.shape[0]:
        raise ValueError(f"group_ids must have shape ({x.shape[0]},), got {tuple(ids.shape)}")
    _, inverse = torch.unique(ids, return_inverse=True)
    n_groups = int(inverse.max()) + 1 if inverse.numel() else 0
    xd = x.double()
    count = torch.zeros(n_groups, dtype=torch.float64, device=x.device)
    count.index_add_(0, inverse, mf.double().sum(-1))
    total = torch.zeros_like(count).index_add_(0, inverse, (xd * mf).sum(-1))
    mean_g = total / count.clamp(min=1)
    centred = (xd - mean_g[inverse][:, None]) * mf
    if mode == "group_mean":
        return centred.to(torch.float32)
    sq = torch.zeros_like(count).index_add_(0, inverse, (centred**2).sum(-1))
    std_g = torch.where(count > 1, torch.sqrt(sq / (count - 1).clamp(min=1)), torch.ones_like(count))
    return (centred / (std_g[inverse][:, None] + eps)).to(torch.float32)


def return_to_go(x: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """G_t = sum_{s >= t} gamma^(s - t) * x_s * mask_s along the response (dim -1).

    gamma = 1 is a reversed cumulative sum; other gammas run one vectorised step per position.
    """
    _check(x, mask)
    xm = x * mask.to(x.dtype)
    if gamma == 1.0:
        return xm.flip(-1).cumsum(-1).flip(-1)
    out = torch.empty_like(xm)
    running = torch.zeros_like(xm[:, 0])
    for t in range(xm.shape[1] - 1, -1, -1):
        running = xm[:, t] + gamma * running
        out[:, t] = running
    return out


def repro_advantage(
    token_rewards: torch.Tensor,
    reward_mask: torch.Tensor,
    response_mask: torch.Tensor,
    group_ids: torch.Tensor,
    mode: str = "group",
    gamma: float = 1.0,
) -> torch.Tensor:
    """Ã (B, T) float32: return-to-go of the normalised process rewards, masked by ``response_mask``.

    Ã_t = sum_{s >= t} r̃_s over rewarded positions s; tokens after a rollout's last reward
    (its answer part, padding) get 0. Add ``alpha * Ã`` to the outcome advantage.
    """
    _check(token_rewards, reward_mask, response_mask)
    r = normalize_process_rewards(token_rewards, reward_mask, group_ids, mode)
    rtg = return_to_go(r, reward_mask, gamma)
    return rtg * response_mask.to(rtg.dtype)
