"""A KV-cached sampling loop that drops finished sequences from the batch.

``model.generate`` keeps every row until the longest one ends (a finished row keeps being fed
pad tokens), so with completions of mixed lengths most decode FLOPs go to rows that are done.
Here a row leaves the batch at its EOS: its KV-cache rows are dropped with one
``index_select`` per layer (``DynamicCache.reorder_cache``), as ``algos.rollout.eager`` does. The G
completions of a prompt share one prefill: the prompt runs once and its cache rows are copied.

Per step, from the logits z of the live rows (temperature T, optional top-k / top-p truncation):

    log π = log_softmax(z / T)                 recorded for the sampled token (behaviour log-prob)
    H     = -Σ_v π_v log π_v                   entropy of the tempered, untruncated distribution
    y     ~ softmax(truncate(z / T))           inverse-CDF draw: one uniform per row

``torch.multinomial`` (what ``generate`` uses) draws one exponential per vocabulary entry, about
40 ms per step for 16 rows x 49k tokens on one CPU core; the inverse CDF (cumsum + searchsorted)
samples the same distribution with one uniform per row. With ``draw_token`` set to multinomial
the loop reproduces ``generate``'s tokens for the same seed (tests/test_performance.py).
"""
from __future__ import annotations

import torch
from transformers import DynamicCache

from algos.hf_compat import cache_arg
from algos.rollout.base import mask_top_k_top_p

__all__ = ["sample_dropping_finished", "draw_token"]


def draw_token(probs: torch.Tensor) -> torch.Tensor:
    """One token per row of ``probs`` (R, V) by inverse transform sampling: the first index whose
    cumulative probability exceeds u * total, u ~ U[0, 1) (zero-probability tokens never win)."""
    cdf = probs.cumsum(dim=-1)
    u = torch.rand(probs.shape[0], 1, device=probs.device, dtype=cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp(max=probs.shape[-1] - 1)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(dim=-1) - 1).clamp(min=0)


@torch.no_grad()
def sample_dropping_finished(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                             max_new_tokens: int, eos_ids: list[int], pad_id: int, temperature: float = 1.0,
                             top_k: int = 0, top_p: float = 1.0, do_sample: bool = True, repeats: int = 1
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample up to ``max_new_tokens`` after a left-padded batch of prompts (P, L), ``repeats``
    completions per prompt (rows ``i * repeats ... i * repeats + repeats - 1`` belong to prompt i).

    Returns ``(response_ids, logprobs, entropies)``, each (P x repeats, T) with T the longest
    response: responses are right-padded with ``pad_id`` after their EOS, and the two float32
    tensors are 0 past each row's EOS.
    """
    batch, device = input_ids.shape[0] * repeats, input_ids.device
    tokens = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros(batch, max_new_tokens, device=device)
    entropies = torch.zeros(batch, max_new_tokens, device=device)
    eos = torch.tensor(sorted(set(eos_ids)), device=device)
    live = torch.arange(batch, device=device)  # batch row of each row still being decoded
    mask = attention_mask
    cache = DynamicCache(config=model.config)
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=_positions(mask),
                **cache_arg(cache), use_cache=True, logits_to_keep=1)
    logits = out.logits[:, -1]
    if repeats > 1:  # one prefill per prompt, its cache rows copied for each completion
        rows = torch.arange(input_ids.shape[0], device=device).repeat_interleave(repeats)
        cache.reorder_cache(rows)
        mask, logits = mask[rows], logits[rows]
    width = 0
    for step in range(max_new_tokens):
        scaled = logits.float() / temperature
        logp = torch.log_softmax(scaled, dim=-1)
        untruncated = top_k == 0 and top_p >= 1.0
        probs = logp.exp() if untruncated else torch.softmax(mask_top_k_top_p(scaled, top_k, top_p), dim=-1)
        chosen = draw_token(probs) if do_sample else scaled.argmax(dim=-1)
        tokens[live, step] = chosen
        logprobs[live, step] = logp.gather(1, chosen[:, None]).squeeze(1)
        # -inf logits (masked vocabulary) have probability 0: clamp so that 0 * log 0 counts as 0.
        plain = probs if untruncated else logp.exp()
        entropies[live, step] = -(plain * logp.clamp(min=torch.finfo(logp.dtype).min)).sum(dim=-1)
        width = step + 1
        going = ~torch.isin(chosen, eos)
        if step == max_new_tokens - 1 or not bool(going.any()):
            break
        if not bool(going.all()):
            keep = going.nonzero().squeeze(1)
            cache.reorder_cache(keep)
            live, mask, chosen = live[keep], mask[keep], chosen[keep]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        logits = model(input_ids=chosen[:, None], attention_mask=mask, position_ids=_positions(mask)[:, -1:],
                       **cache_arg(cache), use_cache=True).logits[:, -1]
    return tokens[:, :width], logprobs[:, :width], entropies[:, :width]
