"""Multi-sample answer metrics (as in EAGER, arXiv 2510.11170), for a variable number of samples per
prompt. Answers are the last ``\\boxed{}``; grading by :func:`rewards.verify.is_correct`.

  Pass@k   = mean over prompts of [any sample correct]
  Cons@k   = mean over prompts of [the majority answer is correct]   (ties: first answer reaching
             the top count; samples without an answer do not vote)
  PassRate = mean over prompts of (correct samples / samples)
"""
from __future__ import annotations

from collections import Counter

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
