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
