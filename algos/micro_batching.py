"""Micro-batches capped by tokens: rows grouped so each group's padded size stays under a budget.

A micro-batch of rows runs as one padded (rows x longest row) block, so its activation memory grows
with ``rows * longest``, not with the row count alone: eight 8k-token completions need the memory
of 64k tokens. :func:`token_budget_batches` sits beside the trainer's ``micro_batches`` (rows) and
``length_buckets`` (similar lengths) and caps that product instead.
"""
from __future__ import annotations

__all__ = ["padded_tokens", "token_budget_batches"]


def padded_tokens(group: list[int], lengths: dict[int, float] | list[float]) -> float:
    """Positions a group occupies once padded: len(group) * max length (0 for an empty group)."""
    return len(group) * max((lengths[r] for r in group), default=0)


def token_budget_batches(rows: list[int], lengths: list[float], max_tokens: int) -> list[list[int]]:
    """``rows`` (with ``lengths[i]`` the length of ``rows[i]``) in groups whose padded size
    ``len(group) * longest`` is at most ``max_tokens``, longest rows first.

    Rows sorted by length (descending) fill a group until one more row would pass the budget; the
    first row of a group is its longest, so the check is ``(n + 1) * first <= max_tokens``. A row
    longer than the budget on its own gets a group of its own (it cannot be split). Every row
    appears exactly once; no group is empty."""
    if max_tokens < 1:
        raise ValueError(f"the token budget must be >= 1, got {max_tokens}")
    if len(rows) != len(lengths):
        raise ValueError(f"{len(rows)} rows but {len(lengths)} lengths")
    groups: list[list[int]] = []
    longest = 0.0
    for i in sorted(range(len(rows)), key=lambda i: -lengths[i]):
        if not groups or (len(groups[-1]) + 1) * longest > max_tokens:
            groups.append([])
            longest = lengths[i]
        groups[-1].append(rows[i])
    return groups
