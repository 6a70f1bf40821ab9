"""Multi-sample answer metrics (as in EAGER, arXiv 2510.11170), for a variable number of samples per
prompt. Answers are the last ``\\boxed{}``; grading by :func:`rewards.verify.is_correct`.

  Pass@k   = mean over prompts of [any sample correct]
  Cons@k   = mean over prompts of [the majority answer is correct]   (ties: first answer reaching
             the top count; samples without an answer do not vote)
  PassRate = mean over prompts of (correct samples / samples)

Two methods run on the same prompts are compared per prompt (:func:`paired_pass_difference`), with the
percentile bootstrap over groups that LYNX's premature-exit rate also uses (:func:`bootstrap_rate_interval`).
"""
from __future__ import annotations

import math
from collections import Counter

import torch

from rewards.verify import extract_boxed, is_correct


def _key(answer: str) -> str:
    return "".join(answer.split())


def majority_answer(completions: list[str]) -> str | None:
    answers = [a for a in (extract_boxed(c) for c in completions) if a]
    if not answers:
        return None
    counts = Counter(_key(a) for a in answers)
    best = max(counts.values())
    return next(a for a in answers if counts[_key(a)] == best)


def sample_metrics(groups: list[list[str]], golds: list[str]) -> dict[str, float]:
    """Pass@k, Cons@k, PassRate and samples per prompt over prompts with their completions."""
    if len(groups) != len(golds):
        raise ValueError(f"{len(groups)} groups of completions but {len(golds)} gold answers")
    if not groups:
        raise ValueError("sample_metrics needs at least one prompt")
    passed = cons = rate = 0.0
    for completions, gold in zip(groups, golds):
        correct = [is_correct(c, gold) for c in completions]
        passed += any(correct)
        rate += sum(correct) / max(len(correct), 1)
        vote = majority_answer(completions)
        cons += vote is not None and is_correct("\\boxed{" + vote + "}", gold)
    n = len(groups)
    return {"pass_at_k": passed / n, "cons_at_k": cons / n, "pass_rate": rate / n,
            "samples_per_prompt": sum(len(g) for g in groups) / n}


def bootstrap_rate_interval(hits: torch.Tensor, groups: torch.Tensor, level: float = 0.95,
                            samples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of ``hits.mean()`` resampling whole groups (problems) with
    replacement: events of one rollout are correlated, so the problem is the unit (Efron & Tibshirani,
    *An Introduction to the Bootstrap*, ch. 13). Returns (nan, nan) without events."""
    if not hits.numel():
        return math.nan, math.nan
    ids, group_index = torch.unique(groups, return_inverse=True)
    count = torch.zeros(len(ids)).index_add_(0, group_index, torch.ones(len(hits)))
    total = torch.zeros(len(ids)).index_add_(0, group_index, hits.float())
    draws = torch.randint(len(ids), (samples, len(ids)), generator=torch.Generator().manual_seed(seed))
    rates = total[draws].sum(1) / count[draws].sum(1)
    tail = (1 - level) / 2
    return float(torch.quantile(rates, tail)), float(torch.quantile(rates, 1 - tail))


def paired_pass_difference(solved_a: list[bool], solved_b: list[bool], level: float = 0.95,
                           samples: int = 2000, seed: int = 0) -> dict:
    """Two methods' per-prompt solved flags on the same prompts: the four counts (both, a only, b only,
    neither), the Pass@k difference ``mean(a - b)`` and its percentile bootstrap interval, resampling
    prompts with replacement (the pair is the unit; Efron & Tibshirani, *An Introduction to the
    Bootstrap*, ch. 13)."""
    if len(solved_a) != len(solved_b) or not solved_a:
        raise ValueError(f"paired_pass_difference needs the same prompts for both methods, got "
                         f"{len(solved_a)} and {len(solved_b)}")
    a = torch.tensor(solved_a, dtype=torch.bool)
    b = torch.tensor(solved_b, dtype=torch.bool)
    diff = a.float() - b.float()
    return {"both": int((a & b).sum()), "a_only": int((a & ~b).sum()), "b_only": int((~a & b).sum()),
            "neither": int((~a & ~b).sum()), "difference": float(diff.mean()),
            "interval": bootstrap_rate_interval(diff, torch.arange(len(diff)), level, samples, seed)}
