"""Execution paths and per-layer action tables (Dr.LLM, arXiv 2510.12773).

A *path* is an order-preserving list of block indices, e.g. ``[0, 1, 1, 3]`` for a 4-block
model: block 2 skipped, block 1 repeated. The equivalent *action table* holds, per block,
how many times it runs: 0 skip, 1 execute, 2 repeat (the paper's label y_l = count of l in
the path). Paths are what MCTS edits; action tables are what the routed model and routers use.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

SKIP, EXECUTE, REPEAT = 0, 1, 2
NUM_ACTIONS = 3


def default_path(num_layers: int) -> tuple[int, ...]:
    """The dense path [0, 1, ..., L-1]."""
    return tuple(range(num_layers))


def validate_path(path: Sequence[int], num_layers: int) -> tuple[int, ...]:
    """Check a path is non-decreasing, in range and runs each block at most twice."""
    path = tuple(int(i) for i in path)
    for prev, cur in zip(path, path[1:]):
        if cur < prev:
            raise ValueError(f"path {list(path)} is not order-preserving: block {cur} after block {prev}")
    for i in path:
        if not 0 <= i < num_layers:
            raise ValueError(f"path {list(path)} names block {i}, the model has blocks 0..{num_layers - 1}")
    for i in set(path):
        if path.count(i) > 2:
            raise ValueError(f"path {list(path)} runs block {i} {path.count(i)} times; at most 2 (one repeat)")
    return path


def path_to_actions(path: Sequence[int], num_layers: int) -> list[int]:
    """Per-block counts: a_l = #{i : path_i = l} in {0, 1, 2}."""
    path = validate_path(path, num_layers)
    return [path.count(layer) for layer in range(num_layers)]


def actions_to_path(actions: Sequence[int] | torch.Tensor) -> tuple[int, ...]:
    """Inverse of :func:`path_to_actions`: block l written a_l times, in order."""
    if isinstance(actions, torch.Tensor):
        actions = actions.tolist()
    out: list[int] = []
    for layer, a in enumerate(actions):
        if a not in (SKIP, EXECUTE, REPEAT):
            raise ValueError(f"action {a} for block {layer} is not 0 (skip), 1 (execute) or 2 (repeat)")
        out.extend([layer] * int(a))
    return tuple(out)


def as_action_table(actions, batch_size: int, num_layers: int, device=None) -> torch.Tensor:
    """A (B, L) long tensor from: a (B, L) or (L,) tensor, one path, or a list of B paths."""
    if isinstance(actions, torch.Tensor):
        table = actions.to(device=device, dtype=torch.long)
        if table.dim() == 1:
            table = table.unsqueeze(0).expand(batch_size, -1)
    else:
        actions = list(actions)
        if all(not isinstance(a, (Sequence, torch.Tensor)) for a in actions):
            rows = [path_to_actions(actions, num_layers)] * batch_size  # one path for every row
        else:
            rows = [path_to_actions(p, num_layers) for p in actions]
        table = torch.tensor(rows, dtype=torch.long, device=device)
    if table.shape != (batch_size, num_layers):
        raise ValueError(f"action table has shape {tuple(table.shape)}, expected ({batch_size}, {num_layers})")
    if ((table < SKIP) | (table > REPEAT)).any():
        raise ValueError("actions must be 0 (skip), 1 (execute) or 2 (repeat)")
    return table.contiguous()
