"""EAGER budget reallocation (arXiv 2510.11170) and the four samplers built on EAGER-init.

Budget, in sequences: B = M * P - sum_p n_p, with n_p the sequences EAGER-init made for prompt p.
  * EAGER-adapt (no labels): prompts that hit the cap M share B, at most 3*M extra each.
  * full EAGER (a verifier): prompts with no correct sequence share B, cap-hitting ones first,
    at most 1*M extra each.
Shares are even, the remainder going one each to the first prompts in order. Extra sequences come
from EAGER-init rerun from the prompt root until the allowance is used; prompts below the cap get
theta lowered per retry r = 1, 2, ...: theta * 0.8^r, times a further 0.9^(r-2) from the third retry
on (our reading of the reference's "x0.8 compounding, extra x0.9 from the third").
``full_parallel`` is the baseline: M independent samples per prompt, same decoder, theta = inf.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from algos.rollout.eager import EagerParams, EagerSequence, eager_generate

MODES = ("init", "adapt", "full", "parallel")


def split_budget(budget: int, eligible: list[int], per_prompt_cap: int) -> dict[int, int]:
    """Even split of ``budget`` over ``eligible`` (in order), remainder one each to the first,
    each share capped at ``per_prompt_cap``; prompts with a zero share are left out."""
    if budget <= 0 or not eligible:
        return {}
    base, remainder = divmod(budget, len(eligible))
    shares = {}
    for i, prompt in enumerate(eligible):
        share = min(base + (1 if i < remainder else 0), per_prompt_cap)
        if share > 0:
            shares[prompt] = share
    return shares


def retry_threshold(theta: float, retry: int) -> float:
    """theta * 0.8^r, and * 0.9^(r - 2) from the third retry on."""
    return theta * 0.8 ** retry * 0.9 ** max(0, retry - 2)


@dataclass
class EagerResult:
    sequences: list[EagerSequence]
    initial_counts: list[int]                 # sequences per prompt after EAGER-init
    extra_allowance: dict[int, int] = field(default_factory=dict)
    retries: int = 0

    def per_prompt(self, num_prompts: int) -> list[list[EagerSequence]]:
        groups: list[list[EagerSequence]] = [[] for _ in range(num_prompts)]
        for s in self.sequences:
            groups[s.prompt_index].append(s)
        return groups


Verifier = Callable[[int, list[EagerSequence]], list[bool]]  # (prompt index, its sequences) -> correct?


def eager_sample(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, params: EagerParams,
                 eos_token_ids, mode: str = "init", verifier: Verifier | None = None, end_think_ids=(),
                 generator: torch.Generator | None = None) -> EagerResult:
    """Sample a variable number of sequences per prompt with EAGER-init, EAGER-adapt, full EAGER
    (needs ``verifier``) or the full-parallel baseline."""
    if mode not in MODES:
        raise ValueError(f"EAGER mode must be one of {', '.join(MODES)}, got '{mode}'")
    if mode == "full" and verifier is None:
        raise ValueError("full EAGER needs a verifier (labels); use mode 'adapt' without one")
    m, num_prompts = params.max_sequences, input_ids.shape[0]
    common = dict(eos_token_ids=eos_token_ids, end_think_ids=end_think_ids, generator=generator)
    if mode == "parallel":
        seqs = eager_generate(model, input_ids, attention_mask, replace(params, threshold=float("inf")),
                              copies=m, **common)
        return EagerResult(seqs, [m] * num_prompts)
    seqs = eager_generate(model, input_ids, attention_mask, params, **common)
    counts = [0] * num_prompts
    for s in seqs:
        counts[s.prompt_index] += 1
    result = EagerResult(seqs, counts)
    if mode == "init":
        return result
    budget = m * num_prompts - sum(counts)
    hit_cap = [q for q in range(num_prompts) if counts[q] >= m]
    if mode == "adapt":
        allowance = split_budget(budget, hit_cap, 3 * m)
    else:
        groups = result.per_prompt(num_prompts)
        unsolved = [q for q in range(num_prompts) if not any(verifier(q, groups[q]))]
        ordered = [q for q in unsolved if q in hit_cap] + [q for q in unsolved if q not in hit_cap]
        allowance = split_budget(budget, ordered, m)
    result.extra_allowance = dict(allowance)
    remaining = dict(allowance)
    retry = 0
    while remaining:
        retry += 1
        prompts = sorted(remaining)
        thetas = [params.threshold if counts[q] >= m else retry_threshold(params.threshold, retry)
                  for q in prompts]
        index = torch.tensor(prompts, device=input_ids.device)
        new = eager_generate(model, input_ids.index_select(0, index), attention_mask.index_select(0, index),
                             params, caps=[remaining[q] for q in prompts], thresholds=thetas, **common)
        offset = len(result.sequences)
        for s in new:
            s.prompt_index = prompts[s.prompt_index]
            if s.parent is not None:
                s.parent += offset
            remaining[s.prompt_index] -= 1
        result.sequences.extend(new)
        remaining = {q: n for q, n in remaining.items() if n > 0}
    result.retries = retry
    return result
