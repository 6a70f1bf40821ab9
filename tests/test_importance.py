"""Engine-mismatch importance weights (algos.importance) against hand-computed values."""
from __future__ import annotations

import math

import pytest
import torch

from algos.importance import engine_is_weights
from algos.losses import policy_loss

# Two sequences; the second has one padding position. Delta = log pi_train - log pi_engine.
DELTA = torch.tensor([[0.0, math.log(2.0), math.log(4.0)],
                      [math.log(0.5), math.log(5.0), 9.0]])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])
ENGINE = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.5, -2.0]])
TRAIN = ENGINE + DELTA


def weights(mode, cap=3.0):
    return engine_is_weights(TRAIN, ENGINE, MASK, mode, cap)


def test_token_truncate():
    w, stats = weights("token_truncate")
    assert torch.allclose(w, torch.tensor([[1.0, 2.0, 3.0], [0.5, 3.0, 0.0]]))
    assert stats["capped_fraction"].item() == pytest.approx(2 / 5)  # 4 and 5 exceed C = 3
    assert stats["masked_fraction"].item() == 0.0


def test_token_mask():
    w, stats = weights("token_mask")
    assert torch.allclose(w, torch.tensor([[1.0, 2.0, 0.0], [0.5, 0.0, 0.0]]))
    assert stats["masked_fraction"].item() == pytest.approx(2 / 5)
    assert stats["capped_fraction"].item() == 0.0


def test_sequence_modes_use_the_product_of_token_ratios():
    # sequence 1: 1 * 2 * 4 = 8 > C; sequence 2: 0.5 * 5 = 2.5 <= C (the padded 9.0 does not count)
    w, stats = weights("sequence_truncate")
    assert torch.allclose(w, torch.tensor([[3.0, 3.0, 3.0], [2.5, 2.5, 0.0]]))
    assert stats["capped_fraction"].item() == pytest.approx(3 / 5)
    w, stats = weights("sequence_mask")
    assert torch.allclose(w, torch.tensor([[0.0, 0.0, 0.0], [2.5, 2.5, 0.0]]))
    assert stats["masked_fraction"].item() == pytest.approx(3 / 5)


def test_mismatch_statistics():
    _, stats = weights("token_truncate")
    d = [0.0, math.log(2.0), math.log(4.0), math.log(0.5), math.log(5.0)]
    assert stats["abs_logprob_diff"].item() == pytest.approx(sum(abs(x) for x in d) / 5, rel=1e-6)
    assert stats["kl"].item() == pytest.approx(sum(math.exp(x) - 1 - x for x in d) / 5, rel=1e-6)


def test_identical_engines_give_weight_one_and_zero_mismatch():
    w, stats = engine_is_weights(ENGINE, ENGINE.clone(), MASK, "sequence_mask", 1.5)
    assert torch.equal(w, MASK.float())
    assert stats["abs_logprob_diff"].item() == 0.0 and stats["kl"].item() == 0.0


def test_weights_are_detached_and_multiply_the_policy_loss():
    train = TRAIN.clone().requires_grad_(True)
    w, _ = engine_is_weights(train, ENGINE, MASK, "token_truncate", 3.0)
    assert not w.requires_grad
    adv = torch.ones(2, 3)
    plain, _ = policy_loss(train, train.detach(), adv, MASK, agg_mode="token-mean")
    weighted, _ = policy_loss(train, train.detach(), adv, MASK, agg_mode="token-mean", is_weights=w)
    # on-policy ratio 1: per-token loss -A = -1, weighted by w and averaged over the 5 tokens
    assert plain.item() == pytest.approx(-1.0)
    assert weighted.item() == pytest.approx(-(1 + 2 + 3 + 0.5 + 3) / 5)


@pytest.mark.parametrize("mode, cap", [("bogus", 3.0), ("token_mask", 0.0)])
def test_bad_mode_or_cap(mode, cap):
    with pytest.raises(ValueError):
        engine_is_weights(TRAIN, ENGINE, MASK, mode, cap)
