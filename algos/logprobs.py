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


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) over the last dim: H = logsumexp(z) - sum_v softmax(z)_v * z_v.

    Shape ``logits.shape[:-1]``, float32 (float64 for float64 input). Entries at -inf (masked
    vocabulary) contribute 0 instead of NaN.
    """
    out = []
    for _, chunk in _rows(logits):
        probs = torch.softmax(chunk, dim=-1)
        finite = torch.where(torch.isfinite(chunk), chunk, torch.zeros_like(chunk))
        out.append(torch.logsumexp(chunk, dim=-1) - (probs * finite).sum(dim=-1))
    return out[0] if len(out) == 1 else torch.cat(out, dim=0)
