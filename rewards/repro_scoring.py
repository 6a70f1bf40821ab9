"""REPRO scoring helpers: where to score a chain of thought, and how to turn likelihoods into rewards.

REPRO ("Rectifying LLM Thought from Lens of Optimization", arXiv 2512.01925) reads the thinking
part of a response as an optimisation trajectory. This module holds the tokenizer-side and
arithmetic pieces; the model forward that measures the surrogate ``J`` lives in
:mod:`rewards.repro_packing` and the reward object in :mod:`rewards.repro`.

Conventions (positions are in *response* coordinates, 0 = first generated token):

* A *scoring point* ``t`` is a prefix length: "prefix = response[:t]". Point 0 is the baseline
  (answer right after the prompt), the last point is the end of the thinking region.
* A segment ends with a token whose decoded text contains a line break ("\\n"); the next token
  starts a new segment. Detection works on decoded text, so merged tokens such as ``".\\n"``,
  ``"\\n\\n"`` or ``"\\n   "`` (byte-level ``Ċ``/``ĊĊ``/``.Ċ``/``ĊĠĠ``) and SentencePiece byte
  tokens (``<0x0A>``) are all boundaries, whatever the tokenizer.
"""
from __future__ import annotations

import math
import weakref
from typing import Sequence

import torch

__all__ = [
    "token_texts",
    "line_break_flags",
    "thinking_length",
    "select_points",
    "kendall_tau",
    "ema_smooth",
    "dual_scores",
    "step_rewards",
    "baseline_magnitude",
]

# --------------------------------------------------------------------------- tokenizer text

# tokenizer -> {token id: decoded text}. Weak keys: a tokenizer that goes away takes its cache along.
_TEXT_CACHE: "weakref.WeakKeyDictionary[object, dict[int, str]]" = weakref.WeakKeyDictionary()
_TEXT_CACHE_STRONG: dict[int, dict[int, str]] = {}  # for tokenizers that cannot be weak-referenced


def _cache_for(tokenizer) -> dict[int, str]:
    try:
        return _TEXT_CACHE.setdefault(tokenizer, {})
    except TypeError:
        return _TEXT_CACHE_STRONG.setdefault(id(tokenizer), {})


def _as_id_list(ids) -> list[int]:
    if isinstance(ids, torch.Tensor):
        return ids.reshape(-1).tolist()
    return [int(i) for i in ids]


def token_texts(tokenizer, ids) -> list[str]:
    """Decoded text of each token on its own (special tokens kept), cached per tokenizer.

    Each distinct id is decoded once per tokenizer (a batched ``batch_decode`` for the ids not seen
    yet); later calls are dictionary look-ups. Decoding a token alone may differ from decoding it in
    context (a leading SentencePiece space, half of a multi-byte character shows as U+FFFD); that
    is harmless for what we look for (line breaks and an ASCII end-of-thinking marker).
    """
    ids = _as_id_list(ids)
    cache = _cache_for(tokenizer)
    missing = sorted({i for i in ids if i not in cache})
    if missing:
        texts = tokenizer.batch_decode(
            [[i] for i in missing], skip_special_tokens=False, clean_up_tokenization_spaces=False
        )
        cache.update(zip(missing, texts))
    return [cache[i] for i in ids]


def line_break_flags(tokenizer, ids) -> list[bool]:
    """``flags[i]`` is True when token ``i`` ends a segment: its decoded text contains ``"\\n"``."""
    return ["\n" in text for text in token_texts(tokenizer, ids)]


def thinking_length(tokenizer, ids, marker: str | None = "</think>") -> int:
    """Number of leading response tokens that form the thinking region.

    With ``marker`` present in the decoded response (it may span several tokens, e.g.
    ``"</" "think" ">"``), the region stops before the token holding the marker's first character,
    so no part of the marker is scored. Without it (or with ``marker`` None/empty: a non-thinking
    model) the region is the whole response except trailing special tokens (EOS, padding), since a
    prefix that ends in EOS is not a state the answer can follow.

    ``ids`` are the valid response tokens only (no right padding).
    """
    ids = _as_id_list(ids)
    texts = token_texts(tokenizer, ids)
    if marker:
        full = "".join(texts)
        start = full.find(marker)
        if start >= 0:
            end = 0
            for i, text in enumerate(texts):
                end += len(text)
                if end > start:  # token i holds the marker's first character
                    return i
    special = set(getattr(tokenizer, "all_special_ids", None) or [])
    n = len(ids)
    while n > 0 and ids[n - 1] in special:
        n -= 1
    return n


def select_points(
    flags: Sequence[bool], entropies, think_len: int, top_k: int | None = 20
) -> list[int]:
    """Scoring points (sorted prefix lengths) for one response.

    Candidates are the first tokens of segments inside the thinking region: every ``t`` with
    ``1 <= t < think_len`` and ``flags[t - 1]`` (token ``t - 1`` ends a line). The ``top_k`` candidates
    with the highest policy entropy ``entropies[t]`` (the entropy of the distribution that produced
    the segment's first token: the "fork" where the step was chosen) are kept; ties go to the
    earlier position. ``top_k`` None or negative keeps every candidate. Point 0 (the baseline) and
    ``think_len`` (the end of thinking) are always added. An empty thinking region gives ``[0]``.
    """
    if think_len <= 0:
        return [0]
    ent = torch.as_tensor(entropies, dtype=torch.float64).reshape(-1)
    if ent.numel() < think_len:
        raise ValueError(f"need entropies for {think_len} thinking tokens, got {ent.numel()}")
    ent = ent.tolist()
    candidates = [t for t in range(1, think_len) if flags[t - 1]]
    if top_k is not None and top_k >= 0 and len(candidates) > top_k:
        ranked = sorted(candidates, key=lambda t: (-ent[t], t))
        candidates = ranked[:top_k]
    return sorted({0, think_len, *candidates})


# --------------------------------------------------------------------------- dual score


def baseline_magnitude() -> float:
    """Magnitude score of a point that made no progress, L_j = L_b: 1 - tanh(1) ~= 0.2384."""
    return 1.0 - math.tanh(1.0)


def kendall_tau(values) -> float:
    """Kendall's tau-b between ``values`` and their index 0..n-1 (is the sequence increasing?).

    tau-b = (C - D) / sqrt((n0 - n1) * n0), with n0 = n(n-1)/2 pairs, C/D the concordant/discordant
    pairs and n1 the pairs tied in ``values`` (the index has no ties). Equals tau-a = (C - D)/n0 when
    no values tie (the usual case for float log-probs); tau-b is what ``scipy.stats.kendalltau``
    returns. Fewer than two values, or all values equal, give 0 (no trend).
    """
    x = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    n = x.numel()
    if n < 2:
        return 0.0
    diff = x[None, :] - x[:, None]  # diff[i, k] = x_k - x_i
    upper = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)  # pairs i < k
    s = torch.sign(diff)[upper]
    n0 = n * (n - 1) / 2
    n1 = float((s == 0).sum())
    if n0 - n1 <= 0:
        return 0.0
    return float(s.sum() / math.sqrt((n0 - n1) * n0))


def ema_smooth(values, beta: float) -> torch.Tensor:
    """Causal EMA: s_1 = x_1, s_i = beta * s_{i-1} + (1 - beta) * x_i (beta in [0, 1))."""
    x = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"ema must be in [0, 1), got {beta}")
    out = x.clone()
    for i in range(1, x.numel()):
        out[i] = beta * out[i - 1] + (1.0 - beta) * x[i]
    return out


def dual_scores(
    J, stability_weight: float = 0.1, ema: float | None = None, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """REPRO dual score at the points after the baseline.

    ``J`` holds the surrogate at every scoring point, ``J[0] = J_b`` (empty prefix) and ``J[j]``,
    j = 1..n, at the later points. With the mean NLL L = -J (L_b floored at ``eps``):

        magnitude_j = 1 - tanh(L_j / L_b)                              in (0, 1]
        stability_j = (tau_b(J_1..J_j vs 1..j) + 1) / 2                in [0, 1]
        S_j         = (1 - w) * magnitude_j + w * stability_j

    The Kendall tau runs on the EMA-smoothed J when ``ema`` is given (smoothing is causal, so
    stability_j only depends on J_1..J_j). A single point (j = 1) has no trend: stability 0.5,
    the value of tau = 0. Returns three float64 tensors of shape (n,).
    """
    J = torch.as_tensor(J, dtype=torch.float64).reshape(-1)
    if J.numel() < 1:
        raise ValueError("J needs at least the baseline value")
    L = -J
    L_b = torch.clamp(L[0], min=eps)
    magnitude = 1.0 - torch.tanh(L[1:] / L_b)
    seq = J[1:] if ema is None else ema_smooth(J[1:], ema)
    stability = torch.tensor(
        [(kendall_tau(seq[: j + 1]) + 1.0) / 2.0 for j in range(seq.numel())], dtype=torch.float64
    )
    w = float(stability_weight)
    score = (1.0 - w) * magnitude + w * stability
    return magnitude, stability, score


def step_rewards(scores, baseline: float = 0.0) -> torch.Tensor:
    """r_1 = S_1 - S_b, r_j = S_j - S_{j-1}: differences that sum to the net progress S_n - S_b.

    ``baseline`` is S_b, the score of the empty prefix (``ReproReward.empty_score``); measuring the
    first step from it keeps a rollout's total independent of how many points it was cut into."""
    S = torch.as_tensor(scores, dtype=torch.float64).reshape(-1)
    return torch.diff(S, prepend=S.new_full((1,), float(baseline)))
