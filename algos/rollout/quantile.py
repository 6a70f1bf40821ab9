"""A running quantile per group by a fixed-bin histogram: O(1) to add a value, O(bins) to query,
whatever the number of values seen.

EAGER's dynamic threshold (arXiv 2510.11170, reference ``DanielSc4/EAGer``) is the 99th percentile
of every entropy a prompt has seen so far; recomputing it from the list costs O(n) per step and
O(n^2) per decode. The top-K renormalised entropy lies in [0, ln K], so a histogram of ``bins``
equal bins over that range holds all the information the percentile needs, to within one bin.

Quantile (as ``torch.quantile``, linear interpolation): r = (n - 1) q, the value at rank
floor(r) plus (r - floor(r)) times the step to the next rank. The value of rank k is read from
the histogram: the bin j holding rank k (cumulative counts), and inside it the i-th of its c
values, placed at ``low + width * (j + (i + 0.5) / c)``. The true value of rank k lies in the same
bin, so the error is at most one bin width, ``(high - low) / bins``.
"""
from __future__ import annotations

import torch

__all__ = ["RunningQuantile"]


class RunningQuantile:
    """Histograms of ``groups`` streams over [low, high] (values outside are clamped to the end bins)."""

    def __init__(self, groups: int, low: float, high: float, bins: int = 4096, device=None):
        if not high > low or bins < 1:
            raise ValueError(f"need high > low and bins >= 1, got [{low}, {high}] and {bins}")
        self.low, self.high, self.bins = float(low), float(high), int(bins)
        self.width = (self.high - self.low) / self.bins
        self.counts = torch.zeros(groups, bins, dtype=torch.float64, device=device)

    @property
    def seen(self) -> torch.Tensor:
        """Values added per group, (groups,)."""
        return self.counts.sum(-1)

    def add(self, group: torch.Tensor, values: torch.Tensor) -> None:
        """Count ``values[i]`` in group ``group[i]`` (both (N,), on the histogram's device)."""
        if values.numel() == 0:
            return
        j = ((values.double() - self.low) / self.width).floor().clamp(0, self.bins - 1).long()
        self.counts.index_put_((group.long(), j), torch.ones_like(j, dtype=torch.float64), accumulate=True)

    def quantile(self, q: float) -> torch.Tensor:
        """The q-quantile of each group's values, (groups,); NaN for a group without values."""
        n = self.seen
        rank = (n - 1).clamp(min=0) * q
        below = rank.floor()
        above = torch.minimum(below + 1, (n - 1).clamp(min=0))
        low_value, high_value = self._value_at(below), self._value_at(above)
        out = low_value + (rank - below) * (high_value - low_value)
        return torch.where(n > 0, out, torch.full_like(out, float("nan"))).float()

    def _value_at(self, k: torch.Tensor) -> torch.Tensor:
        """Estimated value of 0-based rank ``k`` in each group (see the module doc)."""
        cumulative = self.counts.cumsum(-1)
        j = torch.searchsorted(cumulative, (k + 1)[:, None]).clamp(max=self.bins - 1)
        before = torch.gather(cumulative, 1, j).squeeze(1) - torch.gather(self.counts, 1, j).squeeze(1)
        inside = torch.gather(self.counts, 1, j).squeeze(1).clamp(min=1)
        return self.low + self.width * (j.squeeze(1).double() + (k - before + 0.5) / inside)
