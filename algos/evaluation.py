"""Held-out accuracy: greedy generation, answers checked with the project's verifier."""
from __future__ import annotations

import torch

from algos.rollout import SamplingParams


@torch.no_grad()
def evaluate_accuracy(model, engine, records: list[dict], prompt_text,
                      accelerator=None, batch_size: int = 64) -> dict:
    """Greedy accuracy of ``model`` on ``records`` (split over processes when distributed), sampled by
    ``engine`` (HF or vLLM) with its lengths and greedy decoding; ``prompt_text(record)`` is the
    model's input."""
    from rewards.verify import is_correct

    greedy = engine.with_params(SamplingParams(
        max_new_tokens=engine.params.max_new_tokens, do_sample=False,
        max_prompt_length=engine.params.max_prompt_length))
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    mine = records[rank::world]
    correct, lengths, completions = [], [], []
    for lo in range(0, len(mine), batch_size):
        chunk = mine[lo:lo + batch_size]
        batch = greedy.generate(model, [prompt_text(r) for r in chunk], 1)
        completions += batch.completions
        correct += [float(is_correct(text, str(r["answer"]))) for text, r in zip(batch.completions, chunk)]
        lengths += batch.response_mask.sum(dim=1).tolist()
    totals = torch.tensor([sum(correct), len(correct), sum(lengths)], dtype=torch.float64)
    if accelerator is not None and accelerator.num_processes > 1:
        totals = accelerator.reduce(totals.to(accelerator.device), reduction="sum").cpu()
    n = max(float(totals[1]), 1.0)
    return {"accuracy": float(totals[0]) / n, "mean_length": float(totals[2]) / n, "n": int(totals[1]),
            "completions": completions}  # this process's records, in order
