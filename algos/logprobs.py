"""Token log-probabilities and entropies from logits, computed in float32 without a full
float32 log-softmax copy of the vocabulary for low-precision inputs."""

from __future__ import annotations

import torch

__all__ = ["logprobs_from_logits", "entropy_from_logits"]


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
