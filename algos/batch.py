"""The rollout batch: what a rollout engine hands to rewards, advantages and the update."""
from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch


@dataclass
class RolloutBatch:
    """One batch of sampled completions.

    Shapes: B sequences, P prompt positions (left-padded), T response positions (right-padded).
    ``response_mask`` is 1 on generated tokens up to and including the EOS token.
    ``logprobs`` / ``entropies`` are the behaviour policy's per-token log-prob of the sampled token
    and entropy of its full next-token distribution (temperature applied), both float32.
    ``group_ids`` maps each sequence to its prompt; groups may have different sizes.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    logprobs: torch.Tensor
    entropies: torch.Tensor
    group_ids: torch.Tensor
    prompts: list[str] = field(default_factory=list)
    completions: list[str] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)
    extras: dict[str, list] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.response_ids.shape[0]

    @property
    def input_ids(self) -> torch.Tensor:
        """Prompt and response side by side, (B, P + T)."""
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)

    def select(self, index: torch.Tensor | list[int]) -> "RolloutBatch":
        """The sub-batch of the given rows (tensors indexed, lists picked)."""
        idx = torch.as_tensor(index, dtype=torch.long)
        picked = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                picked[f.name] = value[idx]
            elif isinstance(value, dict):
                picked[f.name] = {k: [v[i] for i in idx.tolist()] for k, v in value.items()}
            else:
                picked[f.name] = [value[i] for i in idx.tolist()] if value else []
        return RolloutBatch(**picked)


def left_pad(rows, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id rows (lists or 1-D tensors) as left-padded (B, max length) ids and attention mask."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, width - len(r):] = torch.as_tensor(r, dtype=torch.long)
        mask[b, width - len(r):] = 1
    return ids, mask


def concat_batches(batches: list[RolloutBatch], pad_id: int) -> RolloutBatch:
    """One batch from several (dynamic sampling's generation rounds): prompts left-padded and
    responses right-padded to the widest, group ids offset so groups of different batches stay apart."""
    if len(batches) == 1:
        return batches[0]
    prompt_width = max(b.prompt_ids.shape[1] for b in batches)
    response_width = max(b.response_ids.shape[1] for b in batches)

    def left(t, value):
        return torch.nn.functional.pad(t, (prompt_width - t.shape[1], 0), value=value)

    def right(t, value):
        return torch.nn.functional.pad(t, (0, response_width - t.shape[1]), value=value)

    offset, group_ids = 0, []
    for b in batches:
        group_ids.append(b.group_ids - b.group_ids.min() + offset if len(b) else b.group_ids)
        offset = int(group_ids[-1].max()) + 1 if len(b) else offset
    keys = batches[0].extras.keys()
    return RolloutBatch(
        prompt_ids=torch.cat([left(b.prompt_ids, pad_id) for b in batches]),
        prompt_mask=torch.cat([left(b.prompt_mask, 0) for b in batches]),
        response_ids=torch.cat([right(b.response_ids, pad_id) for b in batches]),
        response_mask=torch.cat([right(b.response_mask, 0) for b in batches]),
        logprobs=torch.cat([right(b.logprobs, 0.0) for b in batches]),
        entropies=torch.cat([right(b.entropies, 0.0) for b in batches]),
        group_ids=torch.cat(group_ids),
        prompts=[p for b in batches for p in b.prompts],
        completions=[c for b in batches for c in b.completions],
        finish_reasons=[r for b in batches for r in b.finish_reasons],
        extras={k: [v for b in batches for v in b.extras[k]] for k in keys})
