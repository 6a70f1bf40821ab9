"""REPRO surrogate J(t) for every scoring point of a rollout in one forward pass.

The surrogate (arXiv 2512.01925) is the mean log-probability of the ground-truth answer tokens
``a`` (e.g. ``\\boxed{42}``) after the prompt ``q`` and a thinking prefix ``response[:t]``:

    J(t) = (1/|a|) * sum_i log pi(a_i | q, response[:t], a_<i)

The reference implementation runs one full forward pass per point (k + 2 per rollout). Here all
points share one pass over a *packed* sequence

    [ q | response[:T] | a_0..a_{A-2} (copy for t_0) | ... | a_0..a_{A-2} (copy for t_K-1) ]

with a block attention mask: prompt and response tokens are plain causal; the answer copy of
point ``t_j`` sees ``q + response[:t_j]`` and its own earlier answer tokens only, and its position
ids continue from ``len(q) + t_j``, so each copy computes exactly what a separate pass over
``q + response[:t_j] + a`` computes. The first answer token of every point is predicted by the
hidden state of the last prefix token, which the causal main sequence already holds; a copy
therefore needs only the first A - 1 answer tokens. Only the hidden states that predict answer
tokens go through the LM head (no (L, V) logits).

A GRPO batch holds several rollouts of each prompt: where a micro-batch repeats a prompt, each
distinct prompt runs once with a KV cache and every row's tail (response prefix and answer
copies) runs on its prompt's cache under the same block mask (``share_prompts``), the same J with
fewer tokens.

How the mask reaches the model (transformers 5.x): ``create_causal_mask`` in
``transformers/masking_utils.py`` returns any 4D ``attention_mask`` unchanged, and the attention
functions use it as is. ``sdpa`` takes a boolean mask (True = attend); ``eager`` *adds* the mask to
the scores, so it needs an additive float mask (0 / dtype-min). Flash-attention kernels take no
custom mask: the model is switched to ``sdpa`` for the call (``set_attn_implementation``) and back.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from algos.batch import left_pad
from algos.shared_prompt import distinct_prompts

__all__ = [
    "ScoringRequest",
    "PackedBatch",
    "packed_length",
    "build_packed_batch",
    "answer_logprob_packed",
    "answer_logprob_separate",
]


@dataclass
class ScoringRequest:
    """One rollout to score: unpadded prompt and response ids, sorted points, answer ids."""

    prompt_ids: Sequence[int]
    response_ids: Sequence[int]
    points: Sequence[int]
    answer_ids: Sequence[int]

    def __post_init__(self):
        self.prompt_ids = _ids(self.prompt_ids)
        self.response_ids = _ids(self.response_ids)
        self.points = [int(t) for t in self.points]
        self.answer_ids = _ids(self.answer_ids)
        if not self.prompt_ids:
            raise ValueError("REPRO scoring needs a non-empty prompt (the baseline J(0) conditions on it)")
        if not self.answer_ids:
            raise ValueError("REPRO scoring needs a non-empty answer")
        if not self.points or self.points != sorted(set(self.points)) or self.points[0] < 0:
            raise ValueError(f"points must be sorted, distinct and >= 0, got {self.points}")
        if self.points[-1] > len(self.response_ids):
            raise ValueError(f"point {self.points[-1]} is past the response ({len(self.response_ids)} tokens)")


def _ids(x) -> list[int]:
    if isinstance(x, torch.Tensor):
        return x.reshape(-1).tolist()
    return [int(i) for i in x]


def packed_length(req: ScoringRequest) -> int:
    """len(prompt) + last point + (#points) * (len(answer) - 1)."""
    return len(req.prompt_ids) + req.points[-1] + len(req.points) * (len(req.answer_ids) - 1)


@dataclass
class PackedBatch:
    """Packed, right-padded scoring inputs for a micro-batch.

    input_ids, position_ids: (B, L). seg: (B, L) block of each position (0 prompt + response,
    j + 1 answer copy j, -1 padding); prefix_end: (B, L) how many leading positions an answer copy
    sees besides its own block. ``allowed(device)`` expands them to the (B, 1, L, L) bool mask on
    the device (built there, not copied: it is the one L^2-sized input).
    rows: (N,) flat indices b * L + position of the hidden states that predict answer tokens;
    targets: (N,) the answer token each predicts; slots: (N,) index of its (request, point) pair in
    request-major order; n_slots: number of such pairs; answer_len: (n_slots,) |a| per pair.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    seg: torch.Tensor
    prefix_end: torch.Tensor
    rows: torch.Tensor
    targets: torch.Tensor
    slots: torch.Tensor
    n_slots: int
    answer_len: torch.Tensor

    def allowed(self, device=None) -> torch.Tensor:
        """(B, 1, L, L) bool, True where query q may attend to key k:
        k <= q and (same block, or k < prefix_end[q])."""
        seg, prefix_end = self.seg.to(device), self.prefix_end.to(device)
        pos = torch.arange(seg.shape[1], device=seg.device)
        causal = pos[None, :] <= pos[:, None]  # (Q, K)
        visible = (seg[:, :, None] == seg[:, None, :]) | (pos[None, None, :] < prefix_end[:, :, None])
        return (visible & causal[None]).unsqueeze(1)


def build_packed_batch(requests: Sequence[ScoringRequest], pad_id: int = 0) -> PackedBatch:
    """Pack each request and right-pad to the longest; see the module docstring for the layout."""
    lengths = [packed_length(r) for r in requests]
    B, L = len(requests), max(lengths)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    position_ids = torch.zeros((B, L), dtype=torch.long)
    seg = torch.full((B, L), -1, dtype=torch.long)  # 0 main, j + 1 answer copy j, -1 padding
    prefix_end = torch.zeros((B, L), dtype=torch.long)  # copies also see main positions < prefix_end
    rows, targets, slots, answer_len = [], [], [], []
    slot0 = 0
    for b, req in enumerate(requests):
        P, T = len(req.prompt_ids), req.points[-1]
        Lm = P + T
        ans = torch.tensor(req.answer_ids, dtype=torch.long)
        A, K = ans.numel(), len(req.points)
        t = torch.tensor(req.points, dtype=torch.long)  # (K,)
        input_ids[b, :Lm] = torch.tensor(req.prompt_ids + req.response_ids[:T], dtype=torch.long)
        position_ids[b, :Lm] = torch.arange(Lm)
        seg[b, :Lm] = 0
        if A > 1:
            span = slice(Lm, Lm + K * (A - 1))
            input_ids[b, span] = ans[:-1].repeat(K)
            position_ids[b, span] = (P + t[:, None] + torch.arange(A - 1)[None, :]).reshape(-1)
            seg[b, span] = torch.arange(1, K + 1).repeat_interleave(A - 1)
            prefix_end[b, span] = (P + t).repeat_interleave(A - 1)
        # hidden state predicting a_i for point j: a_0 <- last prefix token, a_i <- copy token a_{i-1}
        src = torch.empty((K, A), dtype=torch.long)
        src[:, 0] = P + t - 1
        if A > 1:
            src[:, 1:] = Lm + torch.arange(K)[:, None] * (A - 1) + torch.arange(A - 1)[None, :]
        rows.append((b * L + src).reshape(-1))
        targets.append(ans.repeat(K))
        slots.append((slot0 + torch.arange(K)).repeat_interleave(A))
        answer_len.append(torch.full((K,), A, dtype=torch.long))
        slot0 += K
    return PackedBatch(
        input_ids=input_ids,
        position_ids=position_ids,
        seg=seg,
        prefix_end=prefix_end,
        rows=torch.cat(rows),
        targets=torch.cat(targets),
        slots=torch.cat(slots),
        n_slots=slot0,
        answer_len=torch.cat(answer_len),
    )


# --------------------------------------------------------------------------- model plumbing


def _unwrap(model: nn.Module) -> nn.Module:
    """Strip DDP/DeepSpeed ``.module`` and PEFT wrappers down to the transformers model."""
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    if hasattr(model, "get_base_model"):  # PEFT: adapters stay injected in the base model's layers
        model = model.get_base_model()
    return model


_LOGIT_POSTPROCESS = ("logit_scale", "logits_scaling", "output_multiplier_scale")


def _decoder_and_head(model: nn.Module):
    """(decoder, lm_head, softcap) for the hidden-state path, or None to use the full logits.

    The hidden-state path runs ``get_decoder()`` and applies ``get_output_embeddings()`` to the
    selected rows. Models that post-process logits in their CausalLM forward in ways we do not
    reproduce (a logit scale) fall back to the full forward; final-logit soft-capping (Gemma) is
    applied here.
    """
    cfg = getattr(model, "config", None)
    get_dec = getattr(model, "get_decoder", None)
    get_head = getattr(model, "get_output_embeddings", None)
    if cfg is None or get_dec is None or get_head is None:
        return None
    if any(getattr(cfg, k, None) not in (None, 1, 1.0) for k in _LOGIT_POSTPROCESS):
        return None
    try:
        decoder, head = get_dec(), get_head()
    except (NotImplementedError, AttributeError):
        return None
    if decoder is None or decoder is model or not isinstance(head, nn.Module):
        return None
    return decoder, head, getattr(cfg, "final_logit_softcapping", None)


@contextmanager
def _mask_capable_attention(model: nn.Module):
    """Yield the attention implementation in force; switch flash-style kernels to sdpa meanwhile."""
    cfg = getattr(model, "config", None)
    impl = getattr(cfg, "_attn_implementation", None)
    if impl in (None, "sdpa", "eager") or not hasattr(model, "set_attn_implementation"):
        yield impl
        return
    model.set_attn_implementation("sdpa")
    try:
        yield "sdpa"
    finally:
        model.set_attn_implementation(impl)


def _mask_for(allowed: torch.Tensor, impl: str | None, dtype: torch.dtype) -> torch.Tensor:
    if impl == "sdpa":
        return allowed  # bool, True = attend
    # eager (and anything unknown) adds the mask to the attention scores
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)


def _param(model: nn.Module) -> torch.Tensor:
    return next(model.parameters())


def _token_logprobs(logits_fn, n_rows: int, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """log softmax(logits)[target] in float32, ``chunk`` rows of (rows, V) logits at a time."""
    out = torch.empty(n_rows, dtype=torch.float32, device=targets.device)
    for s in range(0, n_rows, chunk):
        logits = logits_fn(slice(s, s + chunk)).float()
        out[s : s + chunk] = logits.gather(-1, targets[s : s + chunk, None]).squeeze(-1) - torch.logsumexp(
            logits, dim=-1
        )
    return out


def _hidden_with_shared_prompts(decoder: nn.Module, pb: PackedBatch, requests: Sequence[ScoringRequest],
                                prompts: tuple[torch.Tensor, torch.Tensor], distinct: tuple[torch.Tensor, torch.Tensor],
                                impl: str | None, dtype: torch.dtype, device, pad_id: int) -> torch.Tensor:
    """The decoder's last hidden states in ``pb``'s packed layout (B, L, H), with each distinct prompt
    run once (a GRPO group's rollouts share one): the prompts (``prompts``, left-padded; ``distinct``
    from :func:`algos.shared_prompt.distinct_prompts`) with a KV cache; then each row's tail (response
    prefix and answer copies) on its prompt's cache, under ``pb``'s block mask with every real prompt
    token visible. Only positions from each prompt's last token on are filled (the only ones whose
    hidden states predict answer tokens); the prompt's others are zero."""
    first_rows, inverse = (t.to(device) for t in distinct)
    prompt_ids, prompt_mask = (t.to(device).index_select(0, first_rows) for t in prompts)
    P_max = prompt_ids.shape[1]
    out = decoder(input_ids=prompt_ids, attention_mask=prompt_mask,
                  position_ids=(prompt_mask.cumsum(dim=1) - 1).clamp(min=0), use_cache=True)
    prompt_last = out.last_hidden_state[:, -1]  # left padding: every prompt's last token
    cache = out.past_key_values
    cache.batch_select_indices(inverse)
    P = [len(r.prompt_ids) for r in requests]
    tails = [packed_length(r) - p for r, p in zip(requests, P)]
    B, T = len(requests), max(tails)
    tail_ids = torch.full((B, T), pad_id, dtype=torch.long, device=device)
    tail_positions = torch.zeros((B, T), dtype=torch.long, device=device)
    allowed = torch.zeros((B, 1, T, P_max + T), dtype=torch.bool, device=device)
    allowed[:, 0, :, :P_max] = prompt_mask[inverse][:, None, :].bool()
    packed_allowed = pb.allowed(device)
    for b, (p, n) in enumerate(zip(P, tails)):
        tail_ids[b, :n] = pb.input_ids[b, p:p + n].to(device)
        tail_positions[b, :n] = pb.position_ids[b, p:p + n].to(device)
        allowed[b, 0, :n, P_max:P_max + n] = packed_allowed[b, 0, p:p + n, p:p + n]
        allowed[b, 0, n:, P_max + n:] = True  # padding queries: any keys (their outputs are unused)
    tail = decoder(input_ids=tail_ids, attention_mask=_mask_for(allowed, impl, dtype), position_ids=tail_positions,
                   past_key_values=cache, use_cache=True).last_hidden_state
    hidden = tail.new_zeros((B, pb.input_ids.shape[1], tail.shape[-1]))
    for b, (p, n) in enumerate(zip(P, tails)):
        hidden[b, p - 1] = prompt_last[inverse[b]]
        hidden[b, p:p + n] = tail[b, :n]
    return hidden


@torch.no_grad()
def answer_logprob_packed(
    model: nn.Module,
    requests: Sequence[ScoringRequest],
    micro_batch_size: int = 8,
    logits_chunk: int = 4096,
    use_hidden_states: bool | None = None,
    pad_id: int = 0,
    share_prompts: bool = True,
) -> list[torch.Tensor]:
    """J at every point of every request, one packed forward per micro-batch of rollouts.

    Requests are sorted by packed length and cut into micro-batches of ``micro_batch_size``
    (bounds the (B, L, L) mask and activations). ``use_hidden_states`` None picks the
    decoder + LM-head-on-selected-rows path when the model allows it, else the full logits.
    With ``share_prompts`` (hidden-state path), a micro-batch whose rollouts repeat a prompt runs
    each distinct prompt once and the rest on its KV cache (``_hidden_with_shared_prompts``).
    Returns one float32 CPU tensor per request, J in point order. The caller sets eval mode.
    """
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    hf = _unwrap(model)
    parts = _decoder_and_head(hf) if use_hidden_states in (None, True) else None
    if use_hidden_states and parts is None:
        raise ValueError(f"{type(hf).__name__}: no decoder/output-embedding pair for the hidden-state path")
    p = _param(hf)
    device, dtype = p.device, p.dtype
    if not dtype.is_floating_point:
        dtype = torch.float32
    results: list[torch.Tensor | None] = [None] * len(requests)
    order = sorted(range(len(requests)), key=lambda i: -packed_length(requests[i]))
    with _mask_capable_attention(hf) as impl:
        for s in range(0, len(order), micro_batch_size):
            idx = order[s : s + micro_batch_size]
            batch = [requests[i] for i in idx]
            pb = build_packed_batch(batch, pad_id=pad_id)
            rows, targets = pb.rows.to(device), pb.targets.to(device)
            shared = False
            if parts is not None and share_prompts:
                prompts = left_pad([r.prompt_ids for r in batch], pad_id)
                distinct = distinct_prompts(*prompts)
                shared = len(distinct[0]) < len(batch)  # some prompt repeats
            if not shared:  # the whole packed rows, under the (B, 1, L, L) mask
                input_ids = pb.input_ids.to(device)
                position_ids = pb.position_ids.to(device)
                mask = _mask_for(pb.allowed(device), impl, dtype)
            if parts is not None:
                decoder, head, softcap = parts
                if shared:
                    hidden = _hidden_with_shared_prompts(decoder, pb, batch, prompts, distinct, impl, dtype, device,
                                                        pad_id)
                else:
                    hidden = decoder(
                        input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False
                    ).last_hidden_state
                picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)

                def logits_fn(sl, picked=picked, head=head, softcap=softcap):
                    out = head(picked[sl])
                    if softcap:
                        out = torch.tanh(out.float() / softcap) * softcap
                    return out
            else:
                logits = hf(
                    input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False
                ).logits
                flat = logits.reshape(-1, logits.shape[-1])

                def logits_fn(sl, flat=flat, rows=rows):
                    return flat.index_select(0, rows[sl])

            lp = _token_logprobs(logits_fn, rows.numel(), targets, logits_chunk)
            J = torch.zeros(pb.n_slots, dtype=torch.float32, device=device)
            J.index_add_(0, pb.slots.to(device), lp)
            J = (J / pb.answer_len.to(device).float()).cpu()
            start = 0
            for i in idx:
                K = len(requests[i].points)
                results[i] = J[start : start + K]
                start += K
    return results  # type: ignore[return-value]


@torch.no_grad()
def answer_logprob_separate(
    model: nn.Module,
    prompt_ids: Sequence[int],
    response_ids: Sequence[int],
    points: Sequence[int],
    answer_ids: Sequence[int],
) -> torch.Tensor:
    """Reference J: one plain full forward over ``prompt + response[:t] + answer`` per point.

    This is the reference implementation's cost (k + 2 passes per rollout); kept for tests and
    benchmarks. Returns float32 (len(points),) on CPU.
    """
    prompt, response, answer = _ids(prompt_ids), _ids(response_ids), _ids(answer_ids)
    device = _param(model).device
    P, A = len(prompt), len(answer)
    target = torch.tensor(answer, device=device)
    out = []
    for t in points:
        ids = torch.tensor([prompt + response[:t] + answer], device=device)
        logits = model(input_ids=ids, use_cache=False).logits[0].float()
        logp = torch.log_softmax(logits[P + t - 1 : P + t - 1 + A], dim=-1)
        out.append(logp.gather(-1, target[:, None]).mean())
    return torch.stack(out).cpu()
