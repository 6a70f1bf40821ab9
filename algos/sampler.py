"""A KV-cached sampling loop that drops finished sequences from the batch.

``model.generate`` keeps every row until the longest one ends (a finished row keeps being fed
pad tokens), so with completions of mixed lengths most decode FLOPs go to rows that are done.
Here a row leaves the batch at its EOS: its KV-cache rows are dropped with one
``index_select`` per layer (``DynamicCache.reorder_cache``), as ``algos.eager`` does.

Per step, from the logits z of the live rows (temperature T, optional top-k / top-p truncation):

    log π = log_softmax(z / T)                 recorded for the sampled token (behaviour log-prob)
    H     = -Σ_v π_v log π_v                   entropy of the tempered, untruncated distribution
    y     ~ softmax(truncate(z / T))           torch.multinomial, the global RNG, as generate does

While no row has finished, the random stream is consumed exactly as ``generate`` consumes it, so
with the same seed the tokens are the same; once rows leave, later draws differ (same distribution).
"""
from __future__ import annotations

import torch
from transformers import DynamicCache

__all__ = ["sample_dropping_finished"]


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(dim=-1) - 1).clamp(min=0)


@torch.no_grad()
def sample_dropping_finished(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                             max_new_tokens: int, eos_ids: list[int], pad_id: int, temperature: float = 1.0,
                             top_k: int = 0, top_p: float = 1.0, do_sample: bool = True
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample up to ``max_new_tokens`` after a left-padded batch of prompts (B, P).

    Returns ``(response_ids, logprobs, entropies)``, each (B, T) with T the longest response:
    responses are right-padded with ``pad_id`` after their EOS, and the two float32 tensors are 0
    past each row's EOS.
    """
    from algos.rollout import mask_top_k_top_p  # rollout imports this module

    batch, device = input_ids.shape[0], input_ids.device
    tokens = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros(batch, max_new_tokens, device=device)
    entropies = torch.zeros(batch, max_new_tokens, device=device)
    eos = torch.tensor(sorted(set(eos_ids)), device=device)
    live = torch.arange(batch, device=device)  # batch row of each row still being decoded
    mask = attention_mask
    cache = DynamicCache(config=model.config)
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=_positions(mask),
                past_key_values=cache, use_cache=True, logits_to_keep=1)
    width = 0
    for step in range(max_new_tokens):
        scaled = out.logits[:, -1].float() / temperature
        logp = torch.log_softmax(scaled, dim=-1)
        if do_sample:
            probs = torch.softmax(mask_top_k_top_p(scaled, top_k, top_p), dim=-1)
            chosen = torch.multinomial(probs, num_samples=1).squeeze(1)
        else:
            chosen = scaled.argmax(dim=-1)
        tokens[live, step] = chosen
        logprobs[live, step] = logp.gather(1, chosen[:, None]).squeeze(1)
        entropies[live, step] = -(logp.exp() * logp).nansum(dim=-1)
        width = step + 1
        going = ~torch.isin(chosen, eos)
        if step == max_new_tokens - 1 or not bool(going.any()):
            break
        if not bool(going.all()):
            keep = going.nonzero().squeeze(1)
            cache.reorder_cache(keep)
            live, mask, chosen = live[keep], mask[keep], chosen[keep]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        out = model(input_ids=chosen[:, None], attention_mask=mask, position_ids=_positions(mask)[:, -1:],
                    past_key_values=cache, use_cache=True)
    return tokens[:, :width], logprobs[:, :width], entropies[:, :width]
