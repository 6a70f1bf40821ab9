"""What every rollout engine shares: sampling settings, the engine protocol, top-k / top-p
truncation and the response mask."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from algos.batch import RolloutBatch


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    do_sample: bool = True
    max_prompt_length: int = 256
    batch_size: int = 0  # sequences per generate call; 0 = all at once
    drop_finished: bool = True  # our sampling loop (finished rows leave the batch); False: model.generate


class RolloutEngine(Protocol):
    def generate(self, model, prompts: list[str], num_generations: int,
                 extras: dict[str, list] | None = None) -> RolloutBatch: ...


def mask_top_k_top_p(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set logits outside the top-k set and outside the smallest nucleus of mass >= top_p to -inf."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative - torch.softmax(sorted_logits, dim=-1) >= top_p  # mass before this token
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def response_mask_from_ids(response_ids: torch.Tensor, eos_ids: list[int]) -> tuple[torch.Tensor, list[str]]:
    """1 up to and including the first EOS; finish reason 'stop' if an EOS came, else 'length'."""
    is_eos = torch.isin(response_ids, torch.tensor(eos_ids, device=response_ids.device))
    seen_before = (is_eos.cumsum(dim=1) - is_eos.long()) > 0
    mask = (~seen_before).long()
    reasons = ["stop" if row.any() else "length" for row in is_eos]
    return mask, reasons


def tokenize_prompts(tokenizer, prompts: list[str], max_prompt_length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``(input_ids, attention_mask)`` of the prompts, truncated from the left to
    ``max_prompt_length`` tokens (the end of a prompt is what the model continues)."""
    side = tokenizer.truncation_side
    tokenizer.truncation_side = "left"
    try:
        enc = tokenizer(prompts, return_tensors="pt", padding=True, truncation=True,
                        max_length=max_prompt_length, add_special_tokens=False)
    finally:
        tokenizer.truncation_side = side
    return enc.input_ids.to(device), enc.attention_mask.to(device)
