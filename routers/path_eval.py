"""The MCTS reward of a path: is greedy generation under it correct? (Dr.LLM, arXiv 2510.12773).

reward(pi) = 1 if ``is_correct(greedy completion with path pi, gold)`` else 0, with short
generations (15 new tokens for math in the paper). Several paths for the same prompt can be
scored in one mixed-path batch (:meth:`GenerationEvaluator.rewards`).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from rewards.verify import is_correct
from routers.routed_model import RoutedModel


def encode_left_padded(tokenizer, prompts: Sequence[str], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of ``prompts`` tokenised one by one (no special tokens added,
    as :class:`GenerationEvaluator` does) and left-padded with the tokenizer's pad id."""
    rows = [tokenizer(p, return_tensors="pt", add_special_tokens=False)["input_ids"][0] for p in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, width - len(r):] = r
        mask[b, width - len(r):] = 1
    return ids.to(device), mask.to(device)


class GenerationEvaluator:
    """Callable path -> {0.0, 1.0} for one (prompt, gold) example; counts generations run."""

    def __init__(self, routed: RoutedModel, tokenizer, prompt: str, gold: str, max_new_tokens: int = 15,
                 require_boxed: bool = True):
        self.routed, self.tokenizer, self.gold = routed, tokenizer, str(gold)
        self.max_new_tokens, self.require_boxed = max_new_tokens, require_boxed
        enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        self.input_ids = enc["input_ids"].to(routed.device)
        self.attention_mask = enc["attention_mask"].to(routed.device)
        self.generations = 0
        self.last_completions: dict[tuple[int, ...], str] = {}

    def completions(self, paths: Sequence[Sequence[int]]) -> list[str]:
        """Greedy completions of the prompt under each path (one batch, one path per row)."""
        batch = len(paths)
        out = self.routed.generate(self.input_ids.expand(batch, -1), self.attention_mask.expand(batch, -1),
                                   actions=[list(p) for p in paths], max_new_tokens=self.max_new_tokens,
                                   pad_token_id=self.tokenizer.pad_token_id)
        self.generations += batch
        new = out.sequences[:, self.input_ids.shape[1]:]
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        for p, t in zip(paths, texts):
            self.last_completions[tuple(p)] = t
        return texts

    def rewards(self, paths: Sequence[Sequence[int]]) -> list[float]:
        return [float(is_correct(t, self.gold, self.require_boxed)) for t in self.completions(paths)]

    @torch.no_grad()
    def __call__(self, path: Sequence[int]) -> float:
        return self.rewards([path])[0]
