"""REPRO process-reward advantages: normalise the step rewards, then take the return-to-go.

Source: Liu et al., "Rectifying LLM Thought from Lens of Optimization", arXiv 2512.01925. The
final advantage is

    A_t = A_outcome,t + alpha * Ã_t,      Ã_t = sum_{s >= t} gamma^(s-t) * r̃_s   (gamma = 1)

where r̃ are the process rewards (``rewards.repro``: one per scored segment, on the segment's last
token; r_1 = S_1 - S_b, r_j = S_j - S_{j-1}, so a rollout's rewards sum to its net progress
P = S_n - S_b) normalised at the level of the *rollout*, in the way that matches the algorithm:

    r̃_first = (r_first - b) / σ,   r̃_j = r_j / σ   (later points)

    GRPO, PPO              "group"         b, σ = mean and std of P over the prompt's group
    REINFORCE++            "batch_whiten"  b, σ = mean and std of P over the batch (+1e-8 in σ²)
    REINFORCE++-baseline   "group_mean"    b = mean of P over the group, σ = 1

so Ã_0 = (P - b) / σ: the process advantage of a rollout depends on how far it got, not on how
many points were scored on the way. Normalising each point instead, r̃ = (r - mean_g) / std_g as
the paper's code does, gives Ã_0 = (S_n - n·mean_g) / std_g: with identical progress a rollout with
2 points got +3.3 and one with 20 points -4.4, so it rewarded scoring fewer points. Rollouts with
no scored point count in the statistics with P = 0 and receive no term. Group statistics follow
``algos.advantages.group_mean_std`` (unbiased std; a size-1 group is compared with the batch).
For PPO the normalised rewards are folded into the token rewards that GAE consumes (the trainer's
job); ``repro_advantage`` gives the return-to-go form used by GRPO / REINFORCE++.

All functions are pure and vectorised over (B, T) tensors.
"""
from __future__ import annotations

import torch

from algos.advantages import group_mean_std

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
    reduce=None,
) -> torch.Tensor:
    """Normalise process rewards per rollout; 0 off the rewarded positions. Returns float32 (B, T).

    P_i = sum of rollout i's rewards; the first rewarded position gets (r - b_i) / σ_i, the later
    ones r / σ_i, with (b, σ) by ``mode`` (module docstring): "group" (σ + eps), "batch_whiten"
    (sqrt(var + 1e-8), verl ``masked_whiten``), "group_mean" (σ = 1). ``reduce`` sums over
    processes for the batch statistics.
    """
    _check(token_rewards, reward_mask)
    if mode not in MODES:
        raise ValueError(f"unknown process-reward normalisation {mode!r}; choose one of {MODES}")
    x = token_rewards.to(torch.float64)
    mf = reward_mask.to(torch.bool).to(x.dtype)
    progress = (x * mf).sum(dim=-1)
    if mode == "batch_whiten":  # verl masked_whiten statistics over the rollouts of the batch
        reduce = reduce or (lambda t: t)
        n = reduce(progress.new_tensor(float(len(progress))))
        mean = reduce(progress.sum()) / n.clamp(min=1)
        var = reduce(((progress - mean) ** 2).sum()) / (n - 1).clamp(min=1)
        baseline = mean.expand_as(progress)
        scale = torch.sqrt(torch.where(n > 1, var, torch.zeros_like(var)) + 1e-8).expand_as(progress)
    else:
        baseline, std, _ = group_mean_std(progress, group_ids, reduce)
        scale = std + eps if mode == "group" else torch.ones_like(progress)
    first = mf * (mf.cumsum(dim=-1) == 1).to(x.dtype)
    out = (x * mf - baseline[:, None] * first) / scale[:, None]
    return out.to(torch.float32)


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
    reduce=None,
) -> torch.Tensor:
    """Ã (B, T) float32: return-to-go of the normalised process rewards, masked by ``response_mask``.

    Ã_t = sum_{s >= t} r̃_s over rewarded positions s; tokens after a rollout's last reward
    (its answer part, padding) get 0. Add ``alpha * Ã`` to the outcome advantage.
    """
    _check(token_rewards, reward_mask, response_mask)
    r = normalize_process_rewards(token_rewards, reward_mask, group_ids, mode, reduce=reduce)
    rtg = return_to_go(r, reward_mask, gamma)
    return rtg * response_mask.to(rtg.dtype)
