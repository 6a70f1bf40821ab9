"""The MCTS reward of a path: is greedy generation under it correct? (Dr.LLM, arXiv 2510.12773).

reward(pi) = 1 if ``is_correct(greedy completion with path pi, gold)`` else 0, with short
generations (15 new tokens for math in the paper). Several paths for the same prompt can be
scored in one mixed-path batch (:meth:`GenerationEvaluator.rewards`).

Draft verification (ours; the idea of speculative decoding, Leviathan et al. 2023): the dense
path's greedy completion d_1..d_D is computed once. A later path pi runs one teacher-forced
forward over prompt + d; if its argmax at every position equals d, its greedy completion *is* d
(by induction over the positions) and no token is decoded. Otherwise the first disagreement k
gives greedy = d_<k + argmax_k, and decoding continues from the cache cropped to the prompt +
d_<k. The result equals plain greedy decoding under pi up to floating-point ties (one batched
forward against token-by-token steps). A thinking model's path evaluation is then one forward of
~200 tokens instead of ~150 sequential steps for every path that keeps the dense output.

``reward="agreement"`` (ours, cheaper, for thinking models whose greedy answers run to hundreds of
tokens) scores a path by one teacher-forced forward over the dense completion: 1 when the dense
answer was correct, the path's argmax agrees with the dense token at >= ``min_agreement`` of the
positions and at every position of the answer (from ``\boxed`` on), else 0. Base errors are not
searched in this mode (no path can fix what it never generates). Choosing skipped layers by their
agreement with the full model is what Draft & Verify (Zhang et al., ACL 2024) does for
self-speculative decoding; the held-out evaluation still measures real greedy accuracy.

``length_factor`` bounds a diverging path to ``max(32, ceil(length_factor * D))`` new tokens
(within ``max_new_tokens``): a path that needs more than twice the dense model's length to
answer counts by what it wrote by then (a broken path otherwise babbles to the full budget).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from algos.batch import left_pad
from rewards.verify import is_correct
from routers.paths import default_path
from routers.routed_model import RoutedModel


def encode_left_padded(tokenizer, prompts: Sequence[str], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of ``prompts`` tokenised one by one (no special tokens added,
    as :class:`GenerationEvaluator` does) and left-padded with the tokenizer's pad id."""
    rows = [tokenizer(p, return_tensors="pt", add_special_tokens=False)["input_ids"][0] for p in prompts]
    ids, mask = left_pad(rows, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    return ids.to(device), mask.to(device)


PATH_REWARDS = ("generation", "agreement")


@torch.no_grad()
def dense_completions(routed: RoutedModel, tokenizer, prompts: Sequence[str], max_new_tokens: int,
                      batch_size: int = 8) -> list[torch.Tensor]:
    """Greedy new tokens of each prompt on the dense path, in left-padded batches (pads after EOS kept;
    :class:`GenerationEvaluator` trims them)."""
    rows = []
    dense = list(default_path(routed.num_layers))
    for start in range(0, len(prompts), batch_size):
        ids, mask = encode_left_padded(tokenizer, prompts[start:start + batch_size], routed.device)
        out = routed.generate(ids, mask, actions=dense, max_new_tokens=max_new_tokens,
                              pad_token_id=tokenizer.pad_token_id)
        rows.extend(out.sequences[:, ids.shape[1]:])
    return rows


class GenerationEvaluator:
    """Callable path -> {0.0, 1.0} for one (prompt, gold) example; counts generations run.

    With ``verify_draft`` (default) the first generation of the dense path becomes the draft that
    later paths are verified against (module docstring); ``draft_accepted`` counts the paths whose
    completion was the draft without decoding a token (full agreement, with ``reward="agreement"``)."""

    def __init__(self, routed: RoutedModel, tokenizer, prompt: str, gold: str, max_new_tokens: int = 15,
                 require_boxed: bool = True, verify_draft: bool = True, length_factor: float | None = None,
                 draft: torch.Tensor | None = None, reward: str = "generation", min_agreement: float = 0.95):
        if length_factor is not None and length_factor <= 0:
            raise ValueError(f"length_factor must be > 0 (or None for no bound), got {length_factor}")
        if reward not in PATH_REWARDS:
            raise ValueError(f"reward must be one of {PATH_REWARDS}, got {reward!r}")
        if not 0.0 < min_agreement <= 1.0:
            raise ValueError(f"min_agreement must lie in (0, 1], got {min_agreement}")
        self.reward, self.min_agreement = reward, min_agreement
        self.agreements: dict[tuple[int, ...], float] = {}
        self.routed, self.tokenizer, self.gold = routed, tokenizer, str(gold)
        self.max_new_tokens, self.require_boxed = max_new_tokens, require_boxed
        self.verify_draft, self.length_factor = verify_draft, length_factor
        enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        self.input_ids = enc["input_ids"].to(routed.device)
        self.attention_mask = enc["attention_mask"].to(routed.device)
        self.dense_path = default_path(routed.num_layers)
        gen_cfg = getattr(routed.model, "generation_config", None)
        eos = None if gen_cfg is None else gen_cfg.eos_token_id
        self.eos = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
        # the dense path's greedy tokens (through its EOS): given (batched by the caller) or its first generation
        self.draft: torch.Tensor | None = None if draft is None else self._trim(draft.to(routed.device))
        self._answer_start: int | None = None
        self._dense_text, self._dense_right = None, None
        self.generations = 0
        self.draft_accepted = 0
        self.last_completions: dict[tuple[int, ...], str] = {}

    @property
    def searches_base_errors(self) -> bool:
        """Whether a path can fix a wrong dense answer here (only a generated answer can change)."""
        return self.reward == "generation"

    def _trim(self, new: torch.Tensor) -> torch.Tensor:
        """A row of new tokens up to and including its first EOS (the pads after it dropped)."""
        for i, t in enumerate(new.tolist()):
            if t in self.eos:
                return new[:i + 1]
        return new

    def _budget(self) -> int:
        if self.length_factor is None or self.draft is None:
            return self.max_new_tokens
        return min(self.max_new_tokens, max(32, math.ceil(self.length_factor * len(self.draft))))

    def _teacher_forced(self, path: Sequence[int], cache=None):
        """(routed output, argmax at each draft position) of one forward over prompt + draft under ``path``."""
        ids = torch.cat([self.input_ids, self.draft[None]], dim=1)
        out = self.routed(ids, torch.ones_like(ids), actions=[list(path)], past_key_values=cache,
                          logits_to_keep=len(self.draft) + 1)
        return out, out.logits[0, :len(self.draft)].argmax(-1)

    @torch.no_grad()
    def _verified(self, path: Sequence[int]) -> torch.Tensor:
        """Greedy new tokens under ``path``: the draft checked in one forward, decoding from the first miss."""
        draft = self.draft
        P, D = self.input_ids.shape[1], len(draft)
        cache = self.routed.new_cache()
        out, preds = self._teacher_forced(path, cache)
        misses = (preds != draft).nonzero()
        if not len(misses):
            self.draft_accepted += 1
            return draft
        k = int(misses[0])
        budget = self._budget()
        if k >= budget:
            return draft[:budget]
        cache.crop(-(D - k))  # keep the prompt + d_<k; the forward's logits at k predict the next token
        mask = torch.ones(1, P + k, dtype=torch.long, device=draft.device)
        # decode_from stops at the model's generation-config EOS, the same ids as self.eos
        out = self.routed.decode_from(out.logits[:, k], cache, out.actions, draft[None, :k], mask, budget - k)
        return out.sequences[0]

    def answer_start(self) -> int:
        """First draft position of the answer (where ``\\boxed`` begins); the draft's length without one."""
        if self._answer_start is None:
            ids = self.draft.tolist()
            self._answer_start = next((j for j in range(len(ids))
                                       if "\\boxed" in self.tokenizer.decode(ids[:j + 1], skip_special_tokens=True)),
                                      len(ids))
        return self._answer_start

    @torch.no_grad()
    def agreement(self, path: Sequence[int]) -> tuple[float, bool]:
        """(share of draft positions where the path's teacher-forced argmax is the draft token,
        whether it is at every answer position)."""
        same = self._teacher_forced(path)[1] == self.draft
        return float(same.float().mean()), bool(same[self.answer_start():].all())

    def completion_ids(self, paths: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """Greedy new tokens of the prompt under each path (through EOS)."""
        self.generations += len(paths)
        if self.draft is not None and all(tuple(p) == self.dense_path for p in paths):
            return [self.draft for _ in paths]
        if self.verify_draft and self.draft is not None:
            return [self._verified(p) for p in paths]
        batch = len(paths)
        out = self.routed.generate(self.input_ids.expand(batch, -1), self.attention_mask.expand(batch, -1),
                                   actions=[list(p) for p in paths], max_new_tokens=self._budget(),
                                   pad_token_id=self.tokenizer.pad_token_id)
        rows = [self._trim(row) for row in out.sequences[:, self.input_ids.shape[1]:]]
        for p, row in zip(paths, rows):
            if self.draft is None and tuple(p) == self.dense_path:
                self.draft = row
        return rows

    def completions(self, paths: Sequence[Sequence[int]]) -> list[str]:
        """Greedy completions of the prompt under each path (one batch, one path per row)."""
        texts = self.tokenizer.batch_decode([row.tolist() for row in self.completion_ids(paths)],
                                            skip_special_tokens=True)
        for p, t in zip(paths, texts):
            self.last_completions[tuple(p)] = t
        return texts

    def rewards(self, paths: Sequence[Sequence[int]]) -> list[float]:
        if self.reward == "agreement":
            return [self._agreement_reward(p) for p in paths]
        return [float(is_correct(t, self.gold, self.require_boxed)) for t in self.completions(paths)]

    def _agreement_reward(self, path: Sequence[int]) -> float:
        if self._dense_right is None:  # the draft (generated once if not given), judged once
            self._dense_text = self.completions([self.dense_path])[0]
            self._dense_right = is_correct(self._dense_text, self.gold, self.require_boxed)
        dense_text, dense_right = self._dense_text, self._dense_right
        if tuple(path) == self.dense_path:
            return float(dense_right)
        if not dense_right:
            return 0.0
        share, answer_same = self.agreement(path)
        self.agreements[tuple(path)] = share
        self.draft_accepted += share == 1.0  # full agreement: the path's greedy output is the draft
        self.last_completions[tuple(path)] = dense_text if share == 1.0 else None
        return float(share >= self.min_agreement and answer_same)

    @torch.no_grad()
    def __call__(self, path: Sequence[int]) -> float:
        return self.rewards([path])[0]
