"""EAGER's dynamic threshold from a running histogram: within one bin of the exact percentile."""
from __future__ import annotations

import math

import pytest
import torch

from algos.rollout import eager as eager_mod
from algos.rollout.quantile import RunningQuantile


@pytest.mark.parametrize("n", [1, 2, 3, 10, 101, 5000])
@pytest.mark.parametrize("q", [0.0, 0.5, 0.99, 1.0])
def test_running_quantile_is_within_one_bin_of_torch_quantile(n, q):
    g = torch.Generator().manual_seed(n)
    high = math.log(20)
    sketch = RunningQuantile(3, 0.0, high, bins=4096)
    streams = [torch.rand(n, generator=g) * high, torch.rand(n, generator=g) ** 4 * high,
               torch.full((n,), 1.234)]
    for k in range(0, n, 7):  # added in pieces, interleaved across groups
        for group, values in enumerate(streams):
            part = values[k:k + 7]
            sketch.add(torch.full((len(part),), group), part)
    got = sketch.quantile(q)
    want = torch.stack([torch.quantile(v, q) for v in streams])
    assert (got - want).abs().max() <= sketch.width + 1e-6


def test_running_quantile_of_an_empty_group_is_nan_and_out_of_range_values_are_clamped():
    sketch = RunningQuantile(2, 0.0, 3.0, bins=30)
    sketch.add(torch.tensor([0, 0]), torch.tensor([-1.0, 9.0]))
    got = sketch.quantile(0.99)
    assert math.isnan(float(got[1]))
    assert 2.9 <= float(got[0]) <= 3.0
    assert sketch.seen.tolist() == [2.0, 0.0]
    with pytest.raises(ValueError, match="high > low"):
        RunningQuantile(1, 1.0, 1.0)


class _CheckedQuantile(RunningQuantile):
    """The histogram, also keeping every value, checking each query against the exact percentile."""

    checks = 0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.values = [[] for _ in range(self.counts.shape[0])]

    def add(self, group, values):
        super().add(group, values)
        for g, v in zip(group.tolist(), values.tolist()):
            self.values[g].append(v)

    def quantile(self, q):
        got = super().quantile(q)
        for g, values in enumerate(self.values):
            if values:
                exact = eager_mod._effective_theta(-math.inf, values, True)
                assert abs(float(got[g]) - exact) <= self.width + 1e-6
                _CheckedQuantile.checks += 1
        return got


def test_eager_decode_reads_the_dynamic_threshold_within_one_bin(tiny_model_path, monkeypatch):
    """Every step of an EAGER decode with the dynamic threshold queries the histogram, and every
    answer is within one bin (0.0007 nats) of the exact 99th percentile of that prompt's entropies."""
    from algos.models import load_causal_lm, load_tokenizer

    model = load_causal_lm(tiny_model_path).eval()
    tok = load_tokenizer(tiny_model_path)
    enc = tok(["Hello there", "What is 2+3?"], return_tensors="pt", padding=True)
    params = eager_mod.EagerParams(max_sequences=6, threshold=0.5, dynamic_threshold=True, max_new_tokens=24,
                                   temperature=1.0)
    monkeypatch.setattr(eager_mod, "RunningQuantile", _CheckedQuantile)
    seqs = eager_mod.eager_generate(model, enc["input_ids"], enc["attention_mask"], params, {tok.eos_token_id},
                                    generator=torch.Generator().manual_seed(0))
    assert _CheckedQuantile.checks >= 2 * 10
    assert any(s.parent is not None for s in seqs)  # the case exercises branching


def test_rows_dropped_at_the_ends_are_a_view_of_the_cache():
    """EAGER keeps a contiguous run of rows as a view of each layer (no copy); anything else reorders."""
    from transformers import DynamicCache

    assert eager_mod.contiguous_rows([2, 3, 4]) == slice(2, 5)
    assert eager_mod.contiguous_rows([0, 2]) is None and eager_mod.contiguous_rows([1, 1]) is None
    assert eager_mod.contiguous_rows([]) is None
    cache = DynamicCache()
    keys = torch.randn(4, 2, 3, 5)
    cache.update(keys, keys.clone(), 0)
    stored = cache.layers[0].keys
    eager_mod._keep_cache_rows(cache, [1, 2], "cpu")
    assert cache.layers[0].keys.data_ptr() == stored[1].data_ptr() and torch.equal(cache.layers[0].keys, keys[1:3])
    eager_mod._keep_cache_rows(cache, [1, 0, 1], "cpu")  # a fork of row 1
    assert torch.equal(cache.layers[0].keys, keys[[2, 1, 2]])
