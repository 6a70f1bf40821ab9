"""An HF-style causal LM that runs along a Dr.LLM path, so other decoding loops can use it.

``RoutedCausalLM(model, decide=router.decider())`` (or ``actions=``) answers
``forward(input_ids, attention_mask, position_ids, cache, use_cache, logits_to_keep,
output_hidden_states)`` like ``*ForCausalLM``: ``.logits``, the cache and ``.hidden_states``
(HF layout: embeddings, blocks 1..L-1, final norm of block L; "the output of
block l" follows the path). The path is chosen at prefill (empty cache) and reused for every
later step, as :class:`routers.routed_model.RoutedModel` requires; the cache is a
:class:`~routers.routed_model.PathCache` (``new_cache()``; it supports ``reorder_cache`` with
repeated or dropped rows, as EAGER's forks and finished rows need, and ``crop``, as LYNX's
rollback needs). The LYNX and EAGER loops run on it unchanged. As HF models across transformers
releases, it takes the cache as ``cache`` or ``past_key_values`` and returns it under the name the
installed transformers uses (:mod:`algos.hf_compat`).
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from algos.hf_compat import cache_arg
from routers.routed_model import Decider, PathCache, RoutedModel


class RoutedCausalLM(nn.Module):
    def __init__(self, model, actions=None, decide: Decider | None = None):
        super().__init__()
        if (actions is None) == (decide is None):
            raise ValueError("give exactly one of `actions` (a path) or `decide` (a router)")
        self.routed = RoutedModel(model)
        self.config = model.config
        self.generation_config = model.generation_config
        self.actions, self.decide = actions, decide
        self.prefill_actions: torch.Tensor | None = None  # (B, L) of the last prefill

    def new_cache(self) -> PathCache:
        return self.routed.new_cache()

    def prompt_layers_executed(self, num_prompts: int) -> list[int]:
        """Block evaluations per token of each prompt's path (rows of the last prefill)."""
        if self.prefill_actions is None:
            raise ValueError("no prefill yet")
        return self.prefill_actions.sum(-1)[:num_prompts].tolist()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: PathCache | None = None,
                use_cache: bool = True, logits_to_keep: int = 0, output_hidden_states: bool = False,
                past_key_values: PathCache | None = None, **unused) -> CausalLMOutputWithPast:
        ignored = {k for k, v in unused.items() if v is not None and k not in ("return_dict", "cache_position")}
        if ignored:
            raise TypeError(f"RoutedCausalLM.forward does not support {sorted(ignored)}")
        if cache is not None and past_key_values is not None:
            raise TypeError("give the cache as `cache` or `past_key_values`, not both")
        cache = cache if cache is not None else past_key_values
        if cache is None and use_cache:
            cache = self.new_cache()
        if cache is not None and not isinstance(cache, PathCache):
            raise TypeError(f"RoutedCausalLM needs its own cache (model.new_cache()), got {type(cache).__name__}")
        prefill = cache is None or cache.seen_tokens == 0
        if prefill:
            path = {"actions": self.actions} if self.actions is not None else {"decide": self.decide}
        else:
            path = {"actions": cache.plan[0]}
        out = self.routed(input_ids, attention_mask, past_key_values=cache, position_ids=position_ids,
                          use_cache=cache is not None, logits_to_keep=logits_to_keep,
                          output_all_hidden_states=output_hidden_states, **path)
        if prefill:
            self.prefill_actions = out.actions
        return CausalLMOutputWithPast(logits=out.logits, hidden_states=out.all_hidden_states, **cache_arg(cache))
