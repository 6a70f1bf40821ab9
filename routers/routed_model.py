"""A frozen HF decoder run along a per-sequence path of blocks (Dr.LLM inference).

Per sequence b and block l the action a[b, l] says: 0 skip (H_l = H_{l-1}), 1 execute
(H_l = f_l(H_{l-1})), 2 repeat (H_l = f_l(f_l(H_{l-1})), same weights). Source: Dr.LLM,
arXiv 2510.12773, Sec. "Inference"; we avoid the reference code's bugs:

* the second pass of a repeated block has its **own KV-cache slot**: slot(l, pass) =
  pass * L + l in a :class:`PathCache` of 2L slots (so the cached computation equals applying
  the block twice to the hidden states);
* decisions are made **once per sequence** at prefill (from actions given, or a ``decide``
  callable such as a router) and reused at every decoding step;
* sequences in a batch may have **different paths**: block l's pass p runs only on the rows
  with a[:, l] > p (a fixed row set per slot, so each slot caches exactly those rows).

Embeddings, rotary position embeddings, mask creation, final norm and LM head are the
model's own modules/utilities (transformers 5.x ``LlamaModel.forward`` layout; Qwen2/Qwen3
share it). Position ids follow HF ``generate``: cumsum(attention_mask) - 1, pads at 0.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
try:
    from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING, Cache
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
except ImportError as exc:  # pragma: no cover - depends on the installed transformers
    raise ImportError(f"routers.routed_model needs transformers >= 5.14 (cache layer types, masking_utils): {exc}") from exc

from algos.hf_compat import cache_arg, cache_layer_types_and_kwargs
from routers.paths import REPEAT, as_action_table

_MASK_FUNCTIONS = {
    "full_attention": create_causal_mask,
    "sliding_attention": create_sliding_window_causal_mask,
}

# decide(layer_idx, hidden_states (B, T, d), token_mask (B, T)) -> actions (B,) in {0, 1, 2}
Decider = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


def row_plan(table: torch.Tensor) -> list[list[torch.Tensor | None | bool]]:
    """Per block and pass, the rows to run for an action table (B, L): None = all rows, False =
    none, else an index tensor. One host sync per table."""
    host = table.tolist()
    plan = []
    for layer in range(table.shape[1]):
        per_pass = []
        for pass_idx in range(REPEAT):
            rows = [b for b, row in enumerate(host) if row[layer] > pass_idx]
            per_pass.append(False if not rows else None if len(rows) == len(host)
                            else torch.tensor(rows, dtype=torch.long, device=table.device))
        plan.append(per_pass)
    return plan


class PathCache(Cache):
    """KV cache with one slot per (block, pass): slot(l, p) = p * L + l, p in {0, 1}.

    Slot (l, p) holds only the rows whose action for block l exceeds p, in batch order."""

    def __init__(self, config, num_layers: int):
        types, kwargs = cache_layer_types_and_kwargs(config)
        layers = [DYNAMIC_LAYER_TYPE_MAPPING[types[i]](**kwargs[i]) for _ in range(2) for i in range(num_layers)]
        super().__init__(layers=layers)
        self.num_blocks = num_layers
        self.seen_tokens = 0  # tokens written so far (same for every used slot)
        self.plan: tuple[torch.Tensor, list] | None = None  # (actions, row plan) fixed at prefill

    def slot(self, layer: int, pass_idx: int) -> int:
        return pass_idx * self.num_blocks + layer

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens seen so far (a slot no row uses stays empty, so per-slot lengths would mislead)."""
        return self.seen_tokens

    def crop(self, max_length: int) -> None:
        """Drop the last ``-max_length`` tokens from every slot (negative values only, as HF's layers)."""
        if max_length >= 0:
            raise ValueError(f"PathCache.crop takes a negative number of tokens to remove, got {max_length}")
        for layer in self.layers:
            if layer.is_initialized:  # a slot no row uses was never written
                layer.crop(max_length)
        self.seen_tokens = max(0, self.seen_tokens + max_length)

    def reorder_cache(self, index: torch.Tensor) -> None:
        """New batch row i = old row ``index[i]`` (rows may repeat or be dropped), path included.

        A slot holds only the rows that use it, so each slot gathers, for every new row that uses
        it, that row's old position inside the slot."""
        if self.plan is None:
            raise ValueError("reorder_cache needs a prefilled PathCache")
        table, plan = self.plan
        index = index.to(device=table.device, dtype=torch.long)
        new_table = table.index_select(0, index)
        new_plan = row_plan(new_table)
        for layer in range(self.num_blocks):
            for pass_idx in range(REPEAT):
                old_rows, new_rows = plan[layer][pass_idx], new_plan[layer][pass_idx]
                if old_rows is False or new_rows is False:  # unused before (so now), or no longer used
                    continue
                wanted = index if new_rows is None else index[new_rows]  # old batch rows, in new order
                if old_rows is not None:  # a slot of some rows: old batch row -> its position in the slot
                    position = torch.empty(table.shape[0], dtype=torch.long, device=table.device)
                    position[old_rows] = torch.arange(len(old_rows), device=table.device)
                    wanted = position[wanted]
                self.layers[self.slot(layer, pass_idx)].reorder_cache(wanted)
        self.plan = (new_table, new_plan)


class _SlotView:
    """What a decoder layer sees as its cache: ``update`` writes to one fixed slot."""

    __slots__ = ("cache", "slot")

    def __init__(self, cache: PathCache, slot: int):
        self.cache, self.slot = cache, slot

    def update(self, key_states, value_states, layer_idx=None, *args, **kwargs):
        return self.cache.update(key_states, value_states, self.slot, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.cache, name)


@dataclass
class RoutedOutput:
    logits: torch.Tensor                 # (B, T or logits_to_keep, V)
    actions: torch.Tensor                # (B, L) actions used
    past_key_values: PathCache | None
    hidden_states: torch.Tensor | None = None  # final-norm input (B, T, d) when asked
    # HF layout when asked (output_all_hidden_states): embeddings, the output of blocks 1..L-1, and
    # the final norm of block L's output; under routing "the output of block l" follows the path
    all_hidden_states: tuple[torch.Tensor, ...] | None = None


@dataclass
class RoutedGeneration:
    sequences: torch.Tensor              # (B, T_prompt + new), as HF generate (pads after EOS)
    actions: torch.Tensor                # (B, L) the path of every sequence
    layers_executed: torch.Tensor        # (B,) block evaluations per token = sum_l a[b, l]
    num_layers: int                      # L of the dense model

    @property
    def mean_layers_executed(self) -> float:
        return float(self.layers_executed.float().mean())


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """HF generate's position ids: cumsum(mask) - 1, with padded positions set to 0."""
    position_ids = attention_mask.long().cumsum(-1) - 1
    return position_ids.masked_fill(attention_mask == 0, 0)


class RoutedModel(nn.Module):
    """Wraps a frozen ``*ForCausalLM`` (``.model.layers``, ``.model.embed_tokens``,
    ``.model.rotary_emb``, ``.model.norm``, ``.lm_head``) and runs it along per-row paths."""

    def __init__(self, model):
        super().__init__()
        body = getattr(model, "model", None)
        needed = ("layers", "embed_tokens", "rotary_emb", "norm")
        if body is None or not all(hasattr(body, n) for n in needed) or not hasattr(model, "lm_head"):
            raise ValueError(f"{type(model).__name__} is not a Llama-family decoder "
                             "(need .model.layers/.embed_tokens/.rotary_emb/.norm and .lm_head)")
        self.model = model
        self.config = model.config
        self.num_layers = len(body.layers)
        types, _ = cache_layer_types_and_kwargs(self.config)
        unsupported = sorted(set(types) - set(_MASK_FUNCTIONS))
        if unsupported:
            raise ValueError(f"RoutedModel supports full/sliding attention layers only, found {unsupported}")
        self.layer_types = list(types)[: self.num_layers]
        for p in model.parameters():
            p.requires_grad_(False)

    @property
    def device(self):
        return self.model.lm_head.weight.device

    def new_cache(self) -> PathCache:
        return PathCache(self.config, self.num_layers)

    def _plan(self, table: torch.Tensor) -> list[list[torch.Tensor | None | bool]]:
        """:func:`row_plan`; the cache keeps the prefill's plan for decoding."""
        return row_plan(table)

    def _mask_builder(self, hidden, attention_mask, position_ids, cache, plan):
        """Lazily build one mask per attention type with the model's own mask utilities.

        With a filled cache, the mask is sized against a slot that some row uses (every used slot
        holds ``cache.seen_tokens`` tokens); at prefill every slot is empty, so any slot will do."""
        masks: dict[str, torch.Tensor | None] = {}

        def get(kind: str):
            if kind not in masks:
                ref = None
                if cache is not None:
                    ref = next(p * self.num_layers + l for p in range(REPEAT) for l in range(self.num_layers)
                               if self.layer_types[l] == kind
                               and (cache.seen_tokens == 0 or plan[l][p] is not False))
                masks[kind] = _MASK_FUNCTIONS[kind](
                    config=self.config, inputs_embeds=hidden, attention_mask=attention_mask,
                    **cache_arg(cache), position_ids=position_ids, layer_idx=ref)
            return masks[kind]

        return get

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                actions=None, decide: Decider | None = None, past_key_values: PathCache | None = None,
                position_ids: torch.Tensor | None = None, use_cache: bool = False,
                inputs_embeds: torch.Tensor | None = None, logits_to_keep: int = 0,
                block_hook: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
                output_hidden_states: bool = False, output_all_hidden_states: bool = False) -> RoutedOutput:
        """Run the routed model on ``input_ids`` (B, T).

        ``attention_mask`` covers past + current tokens (B, past + T), as in HF. Exactly one of
        ``actions`` ((B, L) table, one path, or B paths) or ``decide`` (called per block on the
        hidden states entering it, at prefill) gives the path. ``block_hook(l, h, mask)`` sees the
        hidden states entering every block (teacher forcing)."""
        body = self.model.model
        if inputs_embeds is None:
            inputs_embeds = body.embed_tokens(input_ids)
        batch, length = inputs_embeds.shape[:2]
        cache = past_key_values
        if use_cache and cache is None:
            cache = self.new_cache()
        past = cache.seen_tokens if cache is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(batch, past + length, dtype=torch.long, device=inputs_embeds.device)
        if attention_mask.shape != (batch, past + length):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, "
                             f"expected ({batch}, {past + length}) = (batch, past + new tokens)")
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask)[:, past:]
        if (actions is None) == (decide is None):
            raise ValueError("give exactly one of `actions` (a path per sequence) or `decide` (a router)")
        table, plan = None, None
        if actions is not None:
            if cache is not None and cache.plan is not None and actions is cache.plan[0]:
                table, plan = cache.plan  # decoding with the prefill's decisions: no re-planning
            else:
                table = as_action_table(actions, batch, self.num_layers, device=inputs_embeds.device)
                if past and cache.plan is not None and not torch.equal(table, cache.plan[0]):
                    raise ValueError("decoding must reuse the path chosen at prefill (pass out.actions)")
                plan = self._plan(table)
        elif past:
            raise ValueError("`decide` routes at prefill only; pass the prefill's actions when decoding")

        hidden = inputs_embeds
        cos, sin = body.rotary_emb(hidden, position_ids=position_ids)
        token_mask = attention_mask[:, past:]
        get_mask = self._mask_builder(hidden, attention_mask, position_ids, cache, plan)
        decided = []
        collected = [hidden] if output_all_hidden_states else None
        for layer_idx, layer in enumerate(body.layers):
            if block_hook is not None:
                block_hook(layer_idx, hidden, token_mask)
            if plan is not None:
                layer_plan = plan[layer_idx]
            else:
                col = decide(layer_idx, hidden, token_mask).to(device=hidden.device, dtype=torch.long).view(batch)
                decided.append(col)
                layer_plan = self._plan(col[:, None].expand(batch, self.num_layers))[0]
            for pass_idx, rows in enumerate(layer_plan):
                if rows is False:
                    continue
                mask = get_mask(self.layer_types[layer_idx])
                view = _SlotView(cache, cache.slot(layer_idx, pass_idx)) if cache is not None else None
                if rows is None:
                    hidden = layer(hidden, attention_mask=mask, position_ids=position_ids,
                                   **cache_arg(view), use_cache=cache is not None,
                                   position_embeddings=(cos, sin))
                else:
                    sub_mask = mask[rows] if isinstance(mask, torch.Tensor) and mask.shape[0] == batch else mask
                    out = layer(hidden[rows], attention_mask=sub_mask, position_ids=position_ids[rows],
                                **cache_arg(view), use_cache=cache is not None,
                                position_embeddings=(cos[rows], sin[rows]))
                    hidden = hidden.index_copy(0, rows, out)
            if collected is not None and layer_idx < self.num_layers - 1:
                collected.append(hidden)
        if table is None:
            table = torch.stack(decided, dim=1)
        if cache is not None:
            if past == 0:
                cache.plan = (table, plan if plan is not None else self._plan(table))
            cache.seen_tokens += length
        final = body.norm(hidden)
        if collected is not None:
            collected.append(final)
        if logits_to_keep:
            final = final[:, -logits_to_keep:]
        logits = self.model.lm_head(final)
        return RoutedOutput(logits=logits, actions=table, past_key_values=cache,
                            hidden_states=hidden if output_hidden_states else None,
                            all_hidden_states=tuple(collected) if collected is not None else None)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, actions=None,
                 decide: Decider | None = None, max_new_tokens: int = 20, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
                 generator: torch.Generator | None = None) -> RoutedGeneration:
        """Greedy or sampled decoding with the KV cache, like HF ``generate``: the path is fixed
        at prefill (``actions`` or ``decide``) and reused; rows that hit EOS get pad tokens;
        decoding stops when every row has finished or after ``max_new_tokens``."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        cache = self.new_cache()
        out = self.forward(input_ids, attention_mask, actions=actions, decide=decide,
                           past_key_values=cache, logits_to_keep=1)
        return self.decode_from(out.logits[:, -1], cache, out.actions, input_ids, attention_mask, max_new_tokens,
                                do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                                eos_token_id=eos_token_id, pad_token_id=pad_token_id, generator=generator)

    @torch.no_grad()
    def decode_from(self, logits: torch.Tensor, cache: PathCache, table: torch.Tensor, sequences: torch.Tensor,
                    attention_mask: torch.Tensor, max_new_tokens: int, do_sample: bool = False,
                    temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                    eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
                    generator: torch.Generator | None = None) -> RoutedGeneration:
        """The decoding loop of :meth:`generate`, resumable: ``logits`` [B, V] predict the next token
        after ``cache`` (which covers ``attention_mask``); each picked token is appended to
        ``sequences`` and fed under the path ``table``, at most ``max_new_tokens`` of them."""
        gen_cfg = getattr(self.model, "generation_config", None)
        if eos_token_id is None and gen_cfg is not None:
            eos_token_id = gen_cfg.eos_token_id
        if pad_token_id is None and gen_cfg is not None:
            pad_token_id = gen_cfg.pad_token_id
        eos = torch.tensor([] if eos_token_id is None else
                           ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)),
                           dtype=torch.long, device=sequences.device)
        if pad_token_id is None:
            pad_token_id = int(eos[0]) if eos.numel() else 0
        batch = sequences.shape[0]
        unfinished = torch.ones(batch, dtype=torch.bool, device=sequences.device)
        position_ids = positions_from_mask(attention_mask)[:, -1:]
        for step in range(max_new_tokens):
            next_tokens = _pick(logits.float(), do_sample, temperature, top_k, top_p, generator)
            next_tokens = torch.where(unfinished, next_tokens, torch.full_like(next_tokens, pad_token_id))
            sequences = torch.cat([sequences, next_tokens[:, None]], dim=-1)
            if eos.numel():
                unfinished &= ~torch.isin(next_tokens, eos)
            if not bool(unfinished.any()) or step == max_new_tokens - 1:
                break
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], dim=-1)
            position_ids = position_ids + 1
            logits = self.forward(next_tokens[:, None], attention_mask, actions=table, past_key_values=cache,
                                  position_ids=position_ids, logits_to_keep=1).logits[:, -1]
        return RoutedGeneration(sequences=sequences, actions=table, layers_executed=table.sum(-1),
                                num_layers=self.num_layers)


def _pick(scores: torch.Tensor, do_sample: bool, temperature: float, top_k: int | None,
          top_p: float | None, generator: torch.Generator | None) -> torch.Tensor:
    """Argmax, or a sample after temperature, top-k and top-p (HF's warper order)."""
    if not do_sample:
        return scores.argmax(dim=-1)
    scores = scores / max(temperature, 1e-6)
    if top_k:
        kth = torch.topk(scores, min(top_k, scores.shape[-1]), dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False, dim=-1)
        cum = sorted_scores.softmax(-1).cumsum(-1)
        remove_sorted = cum <= (1 - top_p)
        remove_sorted[:, -1] = False
        scores = scores.masked_fill(remove_sorted.scatter(1, order, remove_sorted), float("-inf"))
    probs = scores.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
