"""Class-conditional split conformal calibration of the exit probe (LYNX, arXiv 2512.05325).

On calibration events (problems disjoint from the probe's training problems), with p the probe's
probability of "safe":

* nonconformity scores: ``s = 1 - p`` for safe events (label 1), ``s = p`` for continue events (0);
* per class c with n_c scores: ``k = ceil((n_c + 1)(1 - delta))``, ``q_c`` = k-th smallest score,
  ``q_c = +inf`` when ``k > n_c`` (the set must then hold label c; the reference takes the max
  score instead, which is slightly less conservative);
* prediction set ``S(x) = {1 if 1 - p <= q_1} U {0 if p <= q_0}``; **exit iff S == {1}**, i.e.
  ``1 - p <= q_1 and p > q_0``.

Guarantee (exchangeable events): P(exit | exiting would be wrong) = P(p > q_0 | label 0) <= delta,
per cue event, not per trajectory. The scores are kept (sorted) so the confidence ``c = 1 - delta``
is chosen at decode time: thresholds are recomputed from them, no recalibration.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


def _check_delta(delta: float) -> float:
    delta = float(delta)
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta = 1 - confidence must be in (0, 1), got {delta}")
    return delta


def conformal_quantile(scores, delta: float) -> float:
    """k-th smallest of n scores with ``k = ceil((n + 1)(1 - delta))``; +inf when k > n (or n = 0)."""
    delta = _check_delta(delta)
    s = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    n = s.size
    # round away float noise first: (n+1)(1-delta) = 90.00000000000001 must give k = 90
    k = math.ceil(round((n + 1) * (1.0 - delta), 9))
    return float(s[k - 1]) if 1 <= k <= n else math.inf


@dataclass(frozen=True)
class ExitRule:
    """Thresholds for one delta; ``should_exit(p)`` is the LYNX decision for probabilities p."""

    delta: float
    q_safe: float  # threshold on 1 - p (label 1 in the set iff 1 - p <= q_safe)
    q_continue: float  # threshold on p (label 0 in the set iff p <= q_continue)

    def prediction_set(self, p) -> tuple[torch.Tensor, torch.Tensor]:
        """(contains "safe", contains "continue") as bool tensors shaped like p."""
        p = torch.as_tensor(p, dtype=torch.float64)
        return (1.0 - p) <= self.q_safe, p <= self.q_continue

    def should_exit(self, p) -> torch.Tensor:
        has_safe, has_continue = self.prediction_set(p)
        return has_safe & ~has_continue

    __call__ = should_exit


class ConformalCalibration:
    """Stored calibration scores of both classes; ``rule(confidence)`` gives an :class:`ExitRule`."""

    def __init__(self, safe_scores, continue_scores):
        self.safe_scores = np.sort(np.asarray(safe_scores, dtype=np.float64).ravel())
        self.continue_scores = np.sort(np.asarray(continue_scores, dtype=np.float64).ravel())

    @classmethod
    def from_probs(cls, probs, labels) -> "ConformalCalibration":
        """Scores from the probe's p on calibration events and their 0/1 labels."""
        p = np.asarray(torch.as_tensor(probs).detach().cpu().double()).ravel()
        y = np.asarray(torch.as_tensor(labels).detach().cpu()).ravel().astype(bool)
        if p.shape != y.shape:
            raise ValueError(f"{p.size} probabilities but {y.size} labels")
        return cls(1.0 - p[y], p[~y])

    @property
    def sizes(self) -> tuple[int, int]:
        """(n_safe, n_continue)."""
        return self.safe_scores.size, self.continue_scores.size

    def thresholds(self, delta: float) -> tuple[float, float]:
        """(q_safe, q_continue) for this delta."""
        return conformal_quantile(self.safe_scores, delta), conformal_quantile(self.continue_scores, delta)

    def rule(self, confidence: float | None = None, delta: float | None = None) -> ExitRule:
        """Exit rule for ``confidence`` c (delta = 1 - c) or directly for ``delta``."""
        if (confidence is None) == (delta is None):
            raise ValueError("give exactly one of confidence or delta")
        delta = _check_delta(1.0 - float(confidence) if delta is None else delta)
        q_safe, q_continue = self.thresholds(delta)
        return ExitRule(delta, q_safe, q_continue)

    def max_confidence(self) -> float:
        """Largest c at which an exit is possible at all: c <= n_0 / (n_0 + 1) (beyond, q_0 = +inf)."""
        n0 = self.continue_scores.size
        return n0 / (n0 + 1.0)

    def to_dict(self) -> dict:
        return {"safe_scores": self.safe_scores.tolist(), "continue_scores": self.continue_scores.tolist()}

    @classmethod
    def from_dict(cls, data: dict) -> "ConformalCalibration":
        return cls(data["safe_scores"], data["continue_scores"])


__all__ = ["ConformalCalibration", "ExitRule", "conformal_quantile"]
