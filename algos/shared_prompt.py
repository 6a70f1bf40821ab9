"""One forward pass per distinct prompt: a GRPO group's completions share their prompt's KV cache.

A rollout batch holds ``num_generations`` completions of each prompt. Run row by row, every
completion recomputes its prompt; on short reasoning traces the prompt is a third of the tokens.
Here each distinct prompt of a micro-batch runs once (with its KV cache kept, with gradients),
the cache is indexed out to the rows that share it, and the completions run on top of it. Every
completion token attends to the same keys and values at the same positions as in the row-by-row
pass, so log-probs and gradients are the same (up to float rounding; the prompt's gradient is the
sum over its completions, which indexing the cache gives).

Source: Liu et al. 2025, "Prefix Grouper: Efficient GRPO Training through Shared-Prefix Forward"
(arXiv:2506.05433), which does the same with a grouped attention; here the model's own KV cache
(transformers' ``DynamicCache``) carries the prefix, so any causal LM and attention kernel works.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

__all__ = ["distinct_prompts", "shared_prompt_forward"]


def distinct_prompts(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(first row of each distinct prompt (U,), each row's prompt index into them (B,)).

    Prompts are compared by ids and mask together (left padding included), in order of first
    appearance."""
    key = torch.cat([prompt_ids.long(), prompt_mask.long()], dim=1)
    _, inverse = torch.unique(key, dim=0, return_inverse=True)
    first: dict[int, int] = {}
    for row, p in enumerate(inverse.tolist()):
        first.setdefault(p, row)
    order = sorted(first, key=first.get)  # prompt ids in order of first appearance
    rank = {p: i for i, p in enumerate(order)}
    rows = torch.tensor([first[p] for p in order], device=prompt_ids.device)
    return rows, torch.tensor([rank[p] for p in inverse.tolist()], device=prompt_ids.device)


def shared_prompt_forward(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                          response_ids: torch.Tensor, response_mask: torch.Tensor, prompts=None,
                          bare_decoder: bool = False):
    """The causal LM's last hidden states over prompt + response, as an output with
    ``hidden_states[-1]`` of shape (B, R + 1, H): position 0 is each row's last prompt token, then
    the response's positions (position t predicts response token t, as ``response_logprobs``
    reads them). Prompts are left-padded (B, P), responses right-padded (B, R).

    Two passes: the distinct prompts (U rows) with ``use_cache``; then the responses, each row on
    its prompt's cache (``DynamicCache.batch_select_indices``, differentiable indexing), at
    positions that continue its prompt's. ``prompts``: ``distinct_prompts``' result, if the caller has it.
    ``bare_decoder``: ``model`` is a decoder without an output layer (a separate PPO critic's backbone,
    ``get_decoder()``), whose output is its ``last_hidden_state``."""
    first, inverse = prompts if prompts is not None else distinct_prompts(prompt_ids, prompt_mask)
    u_mask = prompt_mask[first]
    u_positions = (u_mask.long().cumsum(dim=1) - 1).clamp(min=0)
    empty = torch.empty(0, dtype=torch.long, device=prompt_ids.device)  # no logits: hidden states only
    head = {} if bare_decoder else {"logits_to_keep": empty, "output_hidden_states": True}

    def last_hidden(out):
        return out.last_hidden_state if bare_decoder else out.hidden_states[-1]

    out = model(input_ids=prompt_ids[first], attention_mask=u_mask, position_ids=u_positions,
                use_cache=True, **head)
    last_prompt = last_hidden(out)[:, -1:]  # left padding: the last column is every prompt's last token
    cache = out.past_key_values
    if cache is None:
        raise RuntimeError("the model returned no KV cache (activation checkpointing turns it off): "
                           "run with --shared_prompt_forward false")
    cache.batch_select_indices(inverse)  # transformers' DynamicCache
    lengths = prompt_mask.long().sum(dim=1, keepdim=True)
    positions = lengths + torch.arange(response_ids.shape[1], device=response_ids.device)[None]
    out = model(input_ids=response_ids, attention_mask=torch.cat([prompt_mask, response_mask], dim=1),
                position_ids=positions, past_key_values=cache, use_cache=True, **head)
    hidden = torch.cat([last_prompt[inverse], last_hidden(out)], dim=1)
    return SimpleNamespace(hidden_states=(hidden,))
