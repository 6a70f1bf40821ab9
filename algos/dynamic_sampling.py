"""DAPO's dynamic sampling: keep only the groups whose rewards differ.

A group whose completions all got the same reward has zero advantage under GRPO (and carries no
comparison for any group baseline): it costs a forward and backward pass and teaches nothing. The
trainer drops such groups and samples fresh prompts until the step has its number of informative
groups, for at most ``--dynamic_sampling_max_rounds`` generation rounds.

Source: Yu et al. 2025, "DAPO", section 3.2 (dynamic sampling); verl ``filter_groups``
(``recipe/dapo``: metric, max_num_gen_batches); OpenRLHF ``--dynamic_filtering``.
"""
from __future__ import annotations

import torch


def informative_groups(scores: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """(B,) bool: the rows of groups whose scores are not all equal (a single row is never
    informative). Groups are compared exactly: scores are rewards, not noisy estimates."""
    _, inverse = torch.unique(group_ids, return_inverse=True)
    n = int(inverse.max()) + 1 if len(inverse) else 0
    s = scores.to(torch.float64)
    low = torch.full((n,), float("inf"), dtype=s.dtype).scatter_reduce(0, inverse, s, "amin")
    high = torch.full((n,), float("-inf"), dtype=s.dtype).scatter_reduce(0, inverse, s, "amax")
    return (high > low)[inverse]


def first_groups(keep: torch.Tensor, group_ids: torch.Tensor, count: int) -> list[int]:
    """Row indices of the first ``count`` kept groups, in order of first appearance."""
    chosen: list[int] = []
    order: list[int] = []
    for row, (k, g) in enumerate(zip(keep.tolist(), group_ids.tolist())):
        if not k:
            continue
        if g not in order:
            if len(order) == count:
                continue
            order.append(g)
        chosen.append(row)
    return chosen
