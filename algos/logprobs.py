"""Token log-probabilities and entropies from logits, computed in float32 without a full
float32 log-softmax copy of the vocabulary for low-precision inputs."""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint

__all__ = ["entropy_from_hidden", "entropy_from_logits", "logits_to_keep", "logprobs_from_hidden",
           "logprobs_from_logits", "response_logprobs"]


def _rows(logits: torch.Tensor):
    """Yield (slice or None for everything, float32-or-better chunk) over the leading dim, so that a bf16/fp16 (B, T, V)
    tensor is upcast one sequence at a time instead of all at once."""
    if logits.dtype in (torch.float32, torch.float64):
        yield None, logits
        return
    if logits.dim() < 2:
        yield None, logits.float()
        return
    for i in range(logits.shape[0]):
        yield slice(i, i + 1), logits[i : i + 1].float()


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[labels] = logit[label] - logsumexp(logits), shape ``labels.shape``.

    ``logits`` is (..., V), ``labels`` is (...) int64. Result is float32 (float64 for float64 input).
    Computed as gathered logit minus logsumexp, so no (..., V) log-softmax tensor is materialised.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not match")
    out = []
    for sl, chunk in _rows(logits):
        lab = (labels if sl is None else labels[sl]).long().unsqueeze(-1)
        picked = torch.gather(chunk, -1, lab).squeeze(-1)
        out.append(picked - torch.logsumexp(chunk, dim=-1))
    return out[0] if len(out) == 1 else torch.cat(out, dim=0)


def entropy_from_logits(logits: torch.Tensor, finite: bool = False) -> torch.Tensor:
    """Entropy of softmax(logits) over the last dim: H = lse - sum_v exp(z_v - lse) * z_v, lse = logsumexp(z).

    Shape ``logits.shape[:-1]``, float32 (float64 for float64 input). Entries at -inf (masked
    vocabulary) contribute 0 instead of NaN; ``finite=True`` promises there are none and skips that
    check. A 3-d input is processed one sequence at a time, so the temporaries stay (T, V).
    """
    if logits.dim() == 3 and logits.shape[0] > 1:
        return torch.cat([entropy_from_logits(logits[i:i + 1], finite) for i in range(logits.shape[0])])
    out = []
    for _, chunk in _rows(logits):
        lse = torch.logsumexp(chunk, dim=-1, keepdim=True)
        z = chunk if finite else torch.where(torch.isfinite(chunk), chunk, torch.zeros_like(chunk))
        out.append(lse.squeeze(-1) - (torch.exp(chunk - lse) * z).sum(dim=-1))
    return out[0] if len(out) == 1 else torch.cat(out, dim=0)


# --------------------------------------------------------------------------- from hidden states
# Long completions: the (B, T, V) logits of a 49k vocabulary are 0.2 MB per token in float32, and
# autograd keeps them (and their log-softmax) for the backward pass. These functions go from the
# last hidden states through the model's own output layer to per-token log-probs, ``chunk_size``
# tokens at a time. Each chunk is checkpointed (torch.utils.checkpoint, non-reentrant): its logits
# are recomputed in the backward pass, so the peak is a few (chunk, V) blocks, whatever T is. The
# head is called as a module, so autocast, LoRA on the head, DDP's gradient hooks and DeepSpeed
# ZeRO-3's parameter gathering all apply as in the model's own forward (Liger-Kernel's fused linear
# cross-entropy does the same job with a fused kernel).

DEFAULT_CHUNK = 1024


def _chunk_logits(head, h: torch.Tensor, temperature: float) -> torch.Tensor:
    """(C, V) float32 logits of one chunk of rows, divided by the temperature."""
    z = head(h).float()
    return z / temperature if temperature != 1.0 else z


def _chunk_logprobs(head, h: torch.Tensor, y: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(head(h) / T)[y] for one chunk of rows: z[y] - logsumexp(z), in float32."""
    z = _chunk_logits(head, h, temperature)
    return z.gather(-1, y[:, None]).squeeze(-1) - torch.logsumexp(z, dim=-1)


def _check(hidden: torch.Tensor, temperature: float, chunk_size: int):
    if temperature <= 0 or chunk_size < 1:
        raise ValueError(f"temperature must be > 0 and chunk_size >= 1, got {temperature} and {chunk_size}")
    return hidden.reshape(-1, hidden.shape[-1])


def logprobs_from_hidden(hidden: torch.Tensor, head, labels: torch.Tensor, *, temperature: float = 1.0,
                         chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """log softmax(head(hidden) / T)[labels] for hidden (..., H), labels (...): float32, shape ``labels.shape``.

    ``head`` maps (C, H) to (C, V) logits: the model's output layer (``algos.models.output_head``).
    Equal to ``logprobs_from_logits(head(hidden).float() / T, labels)`` with the same gradients, but
    no more than ``chunk_size`` rows of logits exist at once, in the forward or the backward pass.
    Up to ``chunk_size`` rows in all are one chunk without recomputation (no memory to save)."""
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} do not match")
    flat, ys = _check(hidden, temperature, chunk_size), labels.reshape(-1).long()
    recompute = torch.is_grad_enabled() and flat.shape[0] > chunk_size  # one chunk: kept, as full logits
    run = functools.partial(checkpoint, _chunk_logprobs, use_reentrant=False) if recompute else _chunk_logprobs
    parts = [run(head, flat[lo:lo + chunk_size], ys[lo:lo + chunk_size], temperature)
             for lo in range(0, flat.shape[0], chunk_size)]
    out = torch.cat(parts) if parts else flat.new_zeros(0, dtype=torch.float32)
    return out.view(labels.shape)


@torch.no_grad()
def entropy_from_hidden(hidden: torch.Tensor, head, *, temperature: float = 1.0,
                        chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Entropy of softmax(head(hidden) / T), shape ``hidden.shape[:-1]``, float32, no gradient
    (the trainer logs it); ``chunk_size`` rows of logits at a time (:func:`entropy_from_logits`)."""
    flat = _check(hidden, temperature, chunk_size)
    out = [entropy_from_logits(_chunk_logits(head, flat[lo:lo + chunk_size], temperature), finite=True)
           for lo in range(0, flat.shape[0], chunk_size)]
    return (torch.cat(out) if out else flat.new_zeros(0, dtype=torch.float32)).view(hidden.shape[:-1])


def logits_to_keep(keep: int, chunked: bool, device) -> int | torch.Tensor:
    """transformers' ``logits_to_keep`` for a pass that needs the last ``keep`` positions: ``keep``
    for logits, or an empty index (no logits at all) when the caller chunks the output layer."""
    return torch.empty(0, dtype=torch.long, device=device) if chunked else keep


def response_logprobs(output, head, response_ids: torch.Tensor, *, temperature: float = 1.0,
                      chunk_size: int = DEFAULT_CHUNK, with_entropy: bool = False):
    """(log-probs (B, T), entropies (B, T) or None) of the response tokens, from a causal LM's
    output over prompt + response with the last T + 1 positions kept (position t predicts token t).

    With ``head`` (the model's output layer) from ``output.hidden_states[-1]``, ``chunk_size``
    tokens of logits at a time; without it from ``output.logits``. Logits are divided by T."""
    steps = response_ids.shape[1]
    if head is not None:
        hidden = output.hidden_states[-1][:, -(steps + 1):-1]
        logp = logprobs_from_hidden(hidden, head, response_ids, temperature=temperature, chunk_size=chunk_size)
        entropy = (entropy_from_hidden(hidden.detach(), head, temperature=temperature, chunk_size=chunk_size)
                   if with_entropy else None)
        return logp, entropy
    logits = output.logits[:, -(steps + 1):-1].float()
    if temperature != 1.0:  # a (B, T, V) copy and its gradient saved at T = 1
        logits = logits / temperature
    logp = logprobs_from_logits(logits, response_ids)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = entropy_from_logits(logits.detach(), finite=True)
    return logp, entropy
