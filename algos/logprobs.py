"""Token log-probabilities and entropies from logits, computed in float32 without a full
float32 log-softmax copy of the vocabulary for low-precision inputs."""

from __future__ import annotations

import torch

__all__ = ["entropy_from_hidden", "entropy_from_logits", "logprobs_from_hidden", "logprobs_from_logits"]


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
# last hidden states and the lm_head weight to per-token log-probs, ``chunk_size`` tokens at a time,
# and recompute each chunk's logits in the backward pass: the peak is one (chunk, V) block.

DEFAULT_CHUNK = 1024


class _ChunkedLogprob(torch.autograd.Function):
    """logp = z[y] - logsumexp(z), z = (h W^T + b) / T, per chunk of rows; backward recomputes z:
    d logp / dz = onehot(y) - softmax(z) (the usual softmax cross-entropy gradient)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature, chunk_size):
        device_type = hidden.device.type
        ctx.autocast = (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        for lo in range(0, hidden.shape[0], chunk_size):
            z = _chunk_logits(hidden[lo:lo + chunk_size], weight, bias, temperature)
            picked = z.gather(-1, labels[lo:lo + chunk_size, None]).squeeze(-1)
            out[lo:lo + chunk_size] = picked - torch.logsumexp(z, dim=-1)
        ctx.save_for_backward(hidden, weight, bias, labels)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, labels = ctx.saved_tensors
        device_type, enabled, autocast_dtype = ctx.autocast
        mm_dtype = autocast_dtype if enabled else weight.dtype  # the precision of the forward's matmul
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b and bias is not None else None
        for lo in range(0, hidden.shape[0], ctx.chunk_size):
            h, y = hidden[lo:lo + ctx.chunk_size], labels[lo:lo + ctx.chunk_size, None]
            with torch.autocast(device_type, dtype=autocast_dtype, enabled=enabled):
                z = _chunk_logits(h, weight, bias, ctx.temperature)
            g = z.sub_(torch.logsumexp(z, dim=-1, keepdim=True)).exp_().neg_()  # -softmax(z), in z's memory
            g.scatter_add_(-1, y, torch.ones_like(g[:, :1]))
            g.mul_(grad_out[lo:lo + ctx.chunk_size, None] / ctx.temperature)  # d loss / d (h W^T + b)
            if need_h:
                grad_h[lo:lo + ctx.chunk_size] = (g.to(mm_dtype) @ weight.to(mm_dtype)).to(hidden.dtype)
            if need_w:
                grad_w += (g.to(mm_dtype).t() @ h.to(mm_dtype)).float()
            if grad_b is not None:
                grad_b += g.sum(0)
            del z, g  # one (chunk, V) block at a time
        grad_w = grad_w.to(weight.dtype) if grad_w is not None else None
        grad_b = grad_b.to(bias.dtype) if grad_b is not None else None
        return grad_h, grad_w, grad_b, None, None, None


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, temperature: float):
    """(C, V) float32 logits of a chunk of rows, divided by the temperature (the matmul in the
    caller's autocast precision, as the model's own lm_head would run)."""
    z = torch.nn.functional.linear(h, weight, bias).float()
    return z / temperature if temperature != 1.0 else z


def logprobs_from_hidden(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                         bias: torch.Tensor | None = None, temperature: float = 1.0,
                         chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """log softmax((h W^T + b) / T)[labels] for hidden (..., H), labels (...): float32, shape ``labels.shape``.

    Equal to ``logprobs_from_logits(lm_head(hidden).float() / T, labels)``, with a gradient for
    ``hidden``, ``weight`` and ``bias``, but never more than ``chunk_size`` rows of logits exist at
    once, in the forward or the backward pass (the backward recomputes them)."""
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} do not match")
    if temperature <= 0 or chunk_size < 1:
        raise ValueError(f"temperature must be > 0 and chunk_size >= 1, got {temperature} and {chunk_size}")
    flat = _ChunkedLogprob.apply(hidden.reshape(-1, hidden.shape[-1]), weight, bias,
                                 labels.reshape(-1).long(), float(temperature), int(chunk_size))
    return flat.view(labels.shape)


@torch.no_grad()
def entropy_from_hidden(hidden: torch.Tensor, weight: torch.Tensor, *, bias: torch.Tensor | None = None,
                        temperature: float = 1.0, chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Entropy of softmax((h W^T + b) / T), shape ``hidden.shape[:-1]``, float32, no gradient
    (the trainer logs it); ``chunk_size`` rows of logits at a time (:func:`entropy_from_logits`)."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    out = [entropy_from_logits(_chunk_logits(flat[lo:lo + chunk_size], weight, bias, temperature), finite=True)
           for lo in range(0, flat.shape[0], chunk_size)]
    return (torch.cat(out) if out else flat.new_zeros(0, dtype=torch.float32)).view(hidden.shape[:-1])
