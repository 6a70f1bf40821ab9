"""Hand-computed checks of the RL tensor math in algos/ (advantages, KL, losses, logprobs).

Every expected value below is written out by hand (intermediate steps in comments) or produced by a
tiny, independent pure-python loop in this file -- never by calling the function under test.
"""

import math
import random

import pytest
import torch

from algos.advantages import (
    ADVANTAGE_ESTIMATORS,
    gae,
    group_mean_std,
    grpo,
    masked_mean,
    masked_var,
    masked_whiten,
    reinforce_pp,
    reinforce_pp_baseline,
    rloo,
)
from algos.kl import kl_estimate
from algos.logprobs import entropy_from_logits, logprobs_from_logits
from algos.losses import AGG_MODES, aggregate, policy_loss, value_loss

F64 = torch.float64


def t(x, dtype=F64):
    return torch.tensor(x, dtype=dtype)


def close(actual, expected, atol=1e-6):
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


# ----------------------------------------------------------------------------- pure-python helpers


def py_whiten(valid_values):
    """Explicit verl whitening of a flat list: (x - mean) / sqrt(unbiased var + 1e-8)."""
    n = len(valid_values)
    mean = sum(valid_values) / n
    var = sum((v - mean) ** 2 for v in valid_values) / (n - 1)
    return [(v - mean) / math.sqrt(var + 1e-8) for v in valid_values]


def scatter_valid(rows_mask, flat_values):
    """Put a flat list of per-valid-token values back into (B, T) nested lists (0 at padding)."""
    it = iter(flat_values)
    return [[next(it) if m else 0.0 for m in row] for row in rows_mask]


# ----------------------------------------------------------------------------- masked statistics


MASK_X = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
MASK_M = [[1, 1, 0], [1, 0, 0]]  # valid values: 1, 2, 4


def test_masked_mean_global_and_dim_and_bool_mask():
    x = t(MASK_X)
    close(masked_mean(x, t(MASK_M)), 7.0 / 3.0)  # (1+2+4)/3
    close(masked_mean(x, t(MASK_M), dim=1), [1.5, 4.0])
    close(masked_mean(x, t(MASK_M).bool()), 7.0 / 3.0)
    close(masked_mean(x, torch.zeros(2, 3)), 0.0)  # empty mask: 0, not NaN


def test_masked_var_unbiased_and_biased():
    # mean 7/3; deviations -4/3, -1/3, 5/3; squares 16/9 + 1/9 + 25/9 = 42/9
    x = t(MASK_X)
    close(masked_var(x, t(MASK_M)), (42.0 / 9.0) / 2.0)  # Bessel: / (n - 1) = 7/3
    close(masked_var(x, t(MASK_M), unbiased=False), (42.0 / 9.0) / 3.0)
    # a single valid token has no spread: 0 (documented choice; verl raises)
    close(masked_var(x, t([[0, 1, 0], [0, 0, 0]])), 0.0)


def test_masked_whiten_matches_explicit_formula():
    x = t(MASK_X)
    mean, var = 7.0 / 3.0, 7.0 / 3.0
    scale = 1.0 / math.sqrt(var + 1e-8)
    out = masked_whiten(x, t(MASK_M))
    for (i, j), v in {(0, 0): 1.0, (0, 1): 2.0, (1, 0): 4.0}.items():
        assert abs(out[i, j].item() - (v - mean) * scale) < 1e-9
    # masked positions are transformed with the same statistics (callers multiply by the mask)
    assert abs(out[1, 2].item() - (6.0 - mean) * scale) < 1e-9
    no_shift = masked_whiten(x, t(MASK_M), shift_mean=False)
    assert abs(no_shift[0, 0].item() - ((1.0 - mean) * scale + mean)) < 1e-9
    # whitened valid tokens: mean 0, unbiased variance ~1
    valid = out[t(MASK_M).bool()]
    assert abs(valid.mean().item()) < 1e-9
    assert abs(valid.var(unbiased=True).item() - 1.0) < 1e-6


# ----------------------------------------------------------------------------- GAE

GAE_R = [[0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
GAE_V = [[0.5, 0.6, 0.7, 0.8], [0.2, 0.4, 0.6, 9.9], [0.1, 0.3, 5.0, 0.5]]
GAE_M = [[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 1]]  # padded tail; masked middle (observation)

# gamma = 0.9, lam = 0.8, gamma*lam = 0.72, computed backwards by hand:
# row 0: t3 d=1-0.8=0.2 A=0.2 | t2 d=0.9*0.8-0.7=0.02 A=0.02+0.72*0.2=0.164
#        t1 d=0.9*0.7-0.6=0.03 A=0.03+0.72*0.164=0.14808 | t0 d=0.9*0.6-0.5=0.04 A=0.04+0.72*0.14808=0.1466176
# row 1: t3 padded (value 9.9 must not leak) | t2 d=2-0.6=1.4 A=1.4
#        t1 d=0.9*0.6-0.4=0.14 A=0.14+0.72*1.4=1.148 | t0 d=0.9*0.4-0.2=0.16 A=0.16+0.72*1.148=0.98656
# row 2: t3 d=1-0.5=0.5 A=0.5 | t2 masked: next value 0.5 and A=0.5 pass through (V=5.0 unused)
#        t1 d=0.9*0.5-0.3=0.15 A=0.15+0.72*0.5=0.51 | t0 d=0.9*0.3-0.1=0.17 A=0.17+0.72*0.51=0.5372
GAE_RAW_A = [[0.1466176, 0.14808, 0.164, 0.2], [0.98656, 1.148, 1.4, 0.0], [0.5372, 0.51, 0.0, 0.5]]
GAE_RETURNS = [[0.6466176, 0.74808, 0.864, 1.0], [1.18656, 1.548, 2.0, 0.0], [0.6372, 0.81, 0.0, 1.0]]


def test_gae_hand_computed_with_padding_and_masked_middle():
    adv, ret = gae(t(GAE_R), t(GAE_V), t(GAE_M), gamma=0.9, lam=0.8)
    close(ret, GAE_RETURNS, atol=1e-9)
    flat_raw = [a for row_a, row_m in zip(GAE_RAW_A, GAE_M) for a, m in zip(row_a, row_m) if m]
    close(adv, scatter_valid(GAE_M, py_whiten(flat_raw)), atol=1e-9)


def test_gae_gamma_lambda_one_is_return_minus_value_and_accepts_bool_float32():
    # gamma = lam = 1: A_t = sum_{k>=t} r_k - V_t (telescoping); padded tail ignored
    r = t([[0.0, 0.0, 1.0, 0.0]], torch.float32)
    v = t([[0.2, 0.5, 0.3, 7.0]], torch.float32)
    m = torch.tensor([[True, True, True, False]])
    adv, ret = gae(r, v, m)
    assert adv.dtype == torch.float32
    close(ret, [[1.0, 1.0, 1.0, 0.0]], atol=1e-6)
    close(adv, [scatter_valid([[1, 1, 1, 0]], py_whiten([0.8, 0.5, 0.7]))[0]], atol=1e-5)


def _py_gae(rewards, values, mask, gamma, lam):
    """Independent reference: per-sample python loop over the valid positions only."""
    raw, rets = [], []
    for r, v, m in zip(rewards, values, mask):
        idx = [j for j, mj in enumerate(m) if mj]
        a_row, g_row = [0.0] * len(r), [0.0] * len(r)
        running, next_v = 0.0, 0.0
        for j in reversed(idx):
            running = r[j] + gamma * next_v - v[j] + gamma * lam * running
            next_v = v[j]
            a_row[j], g_row[j] = running, running + v[j]
        raw.append(a_row)
        rets.append(g_row)
    return raw, rets


def test_gae_matches_python_reference_on_random_ragged_batch():
    rng = random.Random(0)
    B, T = 4, 6
    rewards = [[rng.uniform(-1, 1) for _ in range(T)] for _ in range(B)]
    values = [[rng.uniform(-1, 1) for _ in range(T)] for _ in range(B)]
    mask = [[1] * T, [1, 1, 1, 0, 0, 0], [1, 0, 1, 1, 0, 1], [0, 1, 1, 1, 1, 0]]
    raw, rets = _py_gae(rewards, values, mask, 0.95, 0.9)
    adv, ret = gae(t(rewards), t(values), t(mask), gamma=0.95, lam=0.9)
    close(ret, rets, atol=1e-9)
    flat = [a for ra, rm in zip(raw, mask) for a, m in zip(ra, rm) if m]
    close(adv, scatter_valid(mask, py_whiten(flat)), atol=1e-9)


# ----------------------------------------------------------------------------- GRPO

# group 7 = rows {0, 2, 5} (size 3), group 3 = rows {1, 4} (size 2), group 11 = row {3} (size 1)
GRPO_IDS = [7, 3, 7, 11, 3, 7]
GRPO_R = [
    [0.0, 0.0, 1.0],  # s0 = 1.0
    [0.0, 2.0, 0.0],  # s1 = 2.0
    [0.0, 0.0, 5.0],  # s2 = 0.0 (5.0 sits on padding and must be ignored)
    [0.7, 0.0, 0.0],  # s3 = 0.7
    [0.0, 0.0, 0.0],  # s4 = 0.0
    [0.0, 0.5, 0.0],  # s5 = 0.5
]
GRPO_M = [[1, 1, 1], [1, 1, 0], [1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]]


def test_grpo_groups_of_different_sizes_non_contiguous_ids():
    # group 7: mean 0.5, unbiased var (0.25+0.25+0)/2 = 0.25, std 0.5
    # group 3: mean 1.0, unbiased var (1+1)/1 = 2, std sqrt(2)
    # group 11: size 1 -> the mean of the other five scores, (1 + 2 + 0 + 0 + 0.5) / 5 = 0.7: A = 0
    eps = 1e-6
    a7 = 0.5 / (0.5 + eps)
    a3 = 1.0 / (math.sqrt(2.0) + eps)
    a11 = 0.0
    per_seq = [a7, a3, -a7, a11, -a3, 0.0]
    expected = [[a * m for m in row] for a, row in zip(per_seq, GRPO_M)]
    out = grpo(t(GRPO_R), t(GRPO_M), torch.tensor(GRPO_IDS))
    close(out, expected, atol=1e-9)


def test_grpo_singleton_groups_are_measured_against_the_rest_of_the_batch():
    # group 0: scores 1, 0 -> mean 0.5, std sqrt(0.5); singletons: a right answer (1) and a
    # formatted wrong one (0). Leave-one-out baselines: (2 - 1) / 3 = 1/3 and (2 - 0) / 3 = 2/3;
    # batch std of 1, 0, 1, 0 (unbiased) = sqrt(1/3).
    r = [[1.0, 0.0], [0.0, 0.0], [1.0, 0.0], [0.0, 0.0]]
    m = [[1, 0], [1, 0], [1, 0], [1, 0]]
    out = grpo(t(r), t(m), torch.tensor([0, 0, 1, 2]), eps=0.0)[:, 0]
    s = math.sqrt(1 / 3)
    close(out, [0.5 / math.sqrt(0.5), -0.5 / math.sqrt(0.5), (2 / 3) / s, (-2 / 3) / s], atol=1e-9)
    assert out[3] < 0  # the wrong answer is no longer reinforced (verl's raw score gave it 0, a right one 1)
    # alone in the batch: no baseline exists, advantage 0
    close(grpo(t([[0.7]]), t([[1]]), torch.tensor([4]))[:, 0], [0.0], atol=1e-12)
    # scale="batch" divides every group by the batch std
    close(grpo(t(r), t(m), torch.tensor([0, 0, 1, 2]), scale="batch", eps=0.0)[:2, 0],
          [0.5 / s, -0.5 / s], atol=1e-9)


def test_grpo_without_std_normalisation_is_dr_grpo():
    per_seq = [0.5, 1.0, -0.5, 0.0, -1.0, 0.0]  # s_i - mean_g (size-1 group: mean of the others, 0.7)
    expected = [[a * m for m in row] for a, row in zip(per_seq, GRPO_M)]
    out = grpo(t(GRPO_R), t(GRPO_M), torch.tensor(GRPO_IDS), scale="none")
    close(out, expected, atol=1e-9)


def test_grpo_float32_bool_mask_and_group_helper():
    out = grpo(t(GRPO_R, torch.float32), t(GRPO_M).bool(), torch.tensor(GRPO_IDS), scale="none")
    assert out.dtype == torch.float32
    close(out[:, 0], [0.5, 1.0, -0.5, 0.0, -1.0, 0.0], atol=1e-6)
    mean, std, n = group_mean_std(t([1.0, 2.0, 0.0, 0.7, 0.0, 0.5]), torch.tensor(GRPO_IDS))
    # the singleton (row 3): mean of the other five scores, std of all six (unbiased: 2.8 / 5)
    close(mean, [0.5, 1.0, 0.5, 0.7, 1.0, 0.5], atol=1e-12)
    close(std, [0.5, math.sqrt(2.0), 0.5, math.sqrt(0.56), math.sqrt(2.0), 0.5], atol=1e-12)
    close(n, [3.0, 2.0, 3.0, 1.0, 2.0, 3.0])


def test_grpo_matches_python_statistics_reference():
    import statistics

    rng = random.Random(1)
    ids = [rng.choice([-5, 2, 40, 1000]) for _ in range(12)]
    scores = [rng.uniform(-2, 2) for _ in ids]
    expected = []
    for i, (gid, s) in enumerate(zip(ids, scores)):
        grp = [x for g, x in zip(ids, scores) if g == gid]
        others = scores[:i] + scores[i + 1:]
        mean, std = ((statistics.mean(grp), statistics.stdev(grp)) if len(grp) > 1
                     else (statistics.mean(others), statistics.stdev(scores)))
        expected.append((s - mean) / (std + 1e-6))
    rewards = [[0.0, s] for s in scores]
    out = grpo(t(rewards), torch.ones(12, 2), torch.tensor(ids))
    close(out, [[e, e] for e in expected], atol=1e-9)


# ----------------------------------------------------------------------------- REINFORCE++


def test_reinforce_pp_discounted_return_with_padding():
    gamma = 0.5
    r = [[-0.1, 0.0, -0.2, 1.0], [0.0, -0.1, 2.0, 3.0]]  # 3.0 sits on padding
    m = [[1, 1, 1, 1], [1, 1, 1, 0]]
    # row 0: G3=1.0, G2=-0.2+0.5*1.0=0.3, G1=0+0.5*0.3=0.15, G0=-0.1+0.5*0.15=-0.025
    # row 1: padding reset -> G2=2.0, G1=-0.1+0.5*2.0=0.9, G0=0+0.5*0.9=0.45
    g_valid = [-0.025, 0.15, 0.3, 1.0, 0.45, 0.9, 2.0]
    out = reinforce_pp(t(r), t(m), gamma=gamma)
    close(out, scatter_valid(m, py_whiten(g_valid)), atol=1e-9)


def test_reinforce_pp_gamma_one_float32():
    r = t([[0.0, 0.0, 1.0], [0.0, 0.5, 0.0]], torch.float32)
    m = t([[1, 1, 1], [1, 1, 0]], torch.float32)
    # G row0 = [1, 1, 1]; row1 = [0.5, 0.5, pad]
    out = reinforce_pp(r, m)
    assert out.dtype == torch.float32
    close(out, scatter_valid([[1, 1, 1], [1, 1, 0]], py_whiten([1.0, 1.0, 1.0, 0.5, 0.5])), atol=1e-5)


def test_reinforce_pp_baseline_group_mean_then_batch_whiten():
    ids = [5, 2, 5, 9, 2]
    r = [[0.0, 0.0, 1.0], [0.0, 3.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.4], [1.0, 0.0, 0.0]]
    m = [[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]]
    # scores 1, 3, 0, 0.4, 1; group 5 mean 0.5 -> 0.5, -0.5; group 2 mean 2 -> 1, -1;
    # group 9 size 1 -> 0.4 - mean of the others (1 + 3 + 0 + 1) / 4 = -0.85
    per_seq = [0.5, 1.0, -0.5, -0.85, -1.0]
    flat = [a for a, row in zip(per_seq, m) for x in row if x]
    out = reinforce_pp_baseline(t(r), t(m), torch.tensor(ids))
    close(out, scatter_valid(m, py_whiten(flat)), atol=1e-9)


# ----------------------------------------------------------------------------- RLOO


def test_rloo_leave_one_out_with_singleton_group():
    ids = [4, 1, 4, 8, 1, 4]
    r = [[0.0, 1.0], [2.0, 0.0], [0.0, 0.0], [0.3, 0.0], [0.0, 9.0], [0.5, 0.0]]
    m = [[1, 1], [1, 1], [1, 1], [1, 0], [1, 0], [1, 0]]
    # scores: 1, 2, 0, 0.3, 0 (9.0 is padding), 0.5
    # group 4 (rows 0,2,5; sum 1.5): 1-(0.5)/2=0.75, 0-(1.5)/2=-0.75, 0.5-(1.0)/2=0
    # group 1 (rows 1,4): 2-0=2, 0-2=-2 ; group 8: size 1 -> 0
    per_seq = [0.75, 2.0, -0.75, 0.0, -2.0, 0.0]
    expected = [[a * x for x in row] for a, row in zip(per_seq, m)]
    close(rloo(t(r), t(m), torch.tensor(ids)), expected, atol=1e-9)


def test_estimator_registry():
    assert set(ADVANTAGE_ESTIMATORS) == {"gae", "grpo", "reinforce_pp", "reinforce_pp_baseline", "rloo"}
    # one signature: (token_rewards, mask, **inputs) -> (advantages, returns or None)
    r, m, ids = t(GRPO_R), t(GRPO_M), torch.tensor(GRPO_IDS)
    inputs = dict(group_ids=ids, values=torch.zeros_like(r), gamma=1.0, lam=0.9, scale="group")
    for name, fn in ADVANTAGE_ESTIMATORS.items():
        advantages, returns = fn(r, m, **inputs)
        assert advantages.shape == r.shape and (returns is not None) == (name == "gae")
    close(ADVANTAGE_ESTIMATORS["rloo"](r, m, **inputs)[0], rloo(r, m, ids))
    close(ADVANTAGE_ESTIMATORS["gae"](r, m, **inputs)[0], gae(r, torch.zeros_like(r), m, 1.0, 0.9)[0])


# ----------------------------------------------------------------------------- KL


def test_kl_kinds_values_and_aliases():
    logp = t([-1.0, -0.5, -2.0])
    ref = t([-1.5, -0.5, -1.0])  # delta = logp - ref = [0.5, 0, -1]
    close(kl_estimate(logp, ref, "k1"), [0.5, 0.0, -1.0])
    close(kl_estimate(logp, ref, "kl"), [0.5, 0.0, -1.0])
    close(kl_estimate(logp, ref, "k2"), [0.125, 0.0, 0.5])
    close(kl_estimate(logp, ref, "mse"), [0.125, 0.0, 0.5])
    # k3 = exp(-delta) - 1 + delta: e^-0.5 - 0.5 = 0.1065306597, 0, e - 2 = 0.7182818285
    k3 = [0.10653065971263342, 0.0, 0.7182818284590451]
    close(kl_estimate(logp, ref, "k3"), k3, atol=1e-12)
    close(kl_estimate(logp, ref, "low_var_kl"), k3, atol=1e-12)
    close(kl_estimate(logp, ref), k3, atol=1e-12)  # default is k3


def test_kl_k3_clamped_to_ten():
    # delta = -15: e^15 - 16 ~ 3.27e6 -> 10 ; delta = +30: e^-30 - 1 + 30 ~ 29 -> 10 ; delta = 2: e^-2 + 1
    out = kl_estimate(t([-16.0, 29.0, 1.0]), t([-1.0, -1.0, -1.0]), "k3")
    close(out, [10.0, 10.0, math.exp(-2.0) + 1.0], atol=1e-12)
    assert torch.isfinite(kl_estimate(t([-200.0], torch.float32), t([0.0], torch.float32), "k3")).all()


def test_kl_gradients_wrt_logp():
    ref = t([-1.5, -1.0])
    for kind, expected in {
        "k1": [1.0, 1.0],
        "k2": [0.5, -1.0],  # d/dlogp 0.5*delta^2 = delta
        "k3": [1.0 - math.exp(-0.5), 1.0 - math.exp(1.0)],  # 1 - exp(-delta)
    }.items():
        logp = t([-1.0, -2.0]).requires_grad_(True)
        kl_estimate(logp, ref, kind).sum().backward()
        close(logp.grad, expected, atol=1e-12)


def test_kl_unknown_kind_raises_single_line_listing_valid_kinds():
    with pytest.raises(ValueError) as err:
        kl_estimate(t([0.0]), t([0.0]), "k4")
    msg = str(err.value)
    assert "\n" not in msg
    for kind in ("k1", "k2", "k3", "low_var_kl", "kl", "mse"):
        assert kind in msg


# ----------------------------------------------------------------------------- aggregation

AGG_LOSS = [[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]]
AGG_MASK = [[1, 1, 0, 0], [1, 1, 1, 0]]  # valid sums: 3 (2 tokens), 18 (3 tokens)


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("token-mean", 21.0 / 5.0),
        ("seq-mean-token-mean", (3.0 / 2.0 + 18.0 / 3.0) / 2.0),
        ("seq-mean-token-sum", (3.0 + 18.0) / 2.0),
        ("seq-mean-token-sum-norm", 21.0 / (2 * 4)),
    ],
)
def test_aggregate_modes_ragged_mask(mode, expected):
    close(aggregate(t(AGG_LOSS), t(AGG_MASK), mode), expected)
    close(aggregate(t(AGG_LOSS), t(AGG_MASK).bool(), mode), expected)


def test_aggregate_norm_with_explicit_max_len_and_empty_sequence():
    close(aggregate(t(AGG_LOSS), t(AGG_MASK), "seq-mean-token-sum-norm", max_len=10), 21.0 / 20.0)
    loss = t(AGG_LOSS + [[9.0, 10.0, 11.0, 12.0]])
    mask = t(AGG_MASK + [[0, 0, 0, 0]])  # third sequence has no valid token
    close(aggregate(loss, mask, "token-mean"), 21.0 / 5.0)
    close(aggregate(loss, mask, "seq-mean-token-mean"), 3.75)  # empty sequence excluded
    close(aggregate(loss, mask, "seq-mean-token-sum"), 10.5)  # empty sequence excluded
    close(aggregate(loss, mask, "seq-mean-token-sum-norm"), 21.0 / (3 * 4))  # constant B * T
    empty = torch.zeros(2, 4)
    for mode in AGG_MODES:
        close(aggregate(t(AGG_LOSS), empty, mode), 0.0)


def test_aggregate_unknown_mode_raises():
    assert AGG_MODES == ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="seq-mean-token-sum-norm"):
        aggregate(t(AGG_LOSS), t(AGG_MASK), "sum")


# ----------------------------------------------------------------------------- policy loss

# (advantage, ratio) per token; row 1 position 3 is padding
#   a: A=+1 r=1.5  -> max(-1.5, -1.2) = -1.2   clipped
#   b: A=+1 r=0.5  -> max(-0.5, -0.8) = -0.5
#   c: A=-1 r=0.5  -> max( 0.5,  0.8) =  0.8   clipped
#   d: A=-1 r=1.5  -> max( 1.5,  1.2) =  1.5
#   e: A=+2 r=1.1  -> max(-2.2, -2.2) = -2.2   (tie: not counted as clipped)
#   f: A=-2 r=4.0  -> max( 8.0,  2.4) =  8.0   (dual clip c=3: min(8, 6) = 6)
#   h: A=.5 r=1.25 -> max(-0.625, -0.6) = -0.6 clipped (eps_high=0.28: -0.625, not clipped)
#   g: padding, A=5 r=10
PG_ADV = [[1.0, 1.0, -1.0, -1.0], [2.0, -2.0, 0.5, 5.0]]
PG_RATIO = [[1.5, 0.5, 0.5, 1.5], [1.1, 4.0, 1.25, 10.0]]
PG_MASK = [[1, 1, 1, 1], [1, 1, 1, 0]]


def _pg_inputs(requires_grad=False):
    old = t([[-1.0, -2.0, -0.5, -3.0], [-1.2, -0.7, -2.5, -1.0]])
    logp = old + torch.log(t(PG_RATIO))
    logp = logp.detach().requires_grad_(requires_grad)
    return logp, old, t(PG_ADV), t(PG_MASK)


def _approx_kl():
    logs = [math.log(r) for r in (1.5, 0.5, 0.5, 1.5, 1.1, 4.0, 1.25)]
    return -sum(logs) / 7.0


def test_policy_loss_symmetric_clip():
    loss, stats = policy_loss(*_pg_inputs())
    close(loss, (-1.2 - 0.5 + 0.8 + 1.5 - 2.2 + 8.0 - 0.6) / 7.0, atol=1e-9)  # 5.8 / 7
    close(stats["clipfrac"], 3.0 / 7.0)
    close(stats["approx_kl"], _approx_kl(), atol=1e-9)
    assert "dual_clip_frac" not in stats
    assert all(v.dim() == 0 and not v.requires_grad for v in stats.values())


def test_policy_loss_clip_higher():
    loss, stats = policy_loss(*_pg_inputs(), epsilon_low=0.2, epsilon_high=0.28)
    # a: max(-1.5, -1.28) = -1.28 clipped; h: 1.25 < 1.28 -> -0.625 unclipped
    close(loss, (-1.28 - 0.5 + 0.8 + 1.5 - 2.2 + 8.0 - 0.625) / 7.0, atol=1e-9)  # 5.695 / 7
    close(stats["clipfrac"], 2.0 / 7.0)


def test_policy_loss_dual_clip():
    loss, stats = policy_loss(*_pg_inputs(), dual_clip=3.0)
    # only f (A<0, 8 > 3*2) is bounded to 6; A>0 tokens untouched (a would become -3 if misapplied)
    close(loss, (-1.2 - 0.5 + 0.8 + 1.5 - 2.2 + 6.0 - 0.6) / 7.0, atol=1e-9)  # 3.8 / 7
    close(stats["clipfrac"], 3.0 / 7.0)
    close(stats["dual_clip_frac"], 1.0 / 7.0)
    with pytest.raises(ValueError):
        policy_loss(*_pg_inputs(), dual_clip=1.0)


def test_policy_loss_seq_mean_token_mean_aggregation():
    loss, _ = policy_loss(*_pg_inputs(), agg_mode="seq-mean-token-mean")
    row0 = (-1.2 - 0.5 + 0.8 + 1.5) / 4.0
    row1 = (-2.2 + 8.0 - 0.6) / 3.0
    close(loss, (row0 + row1) / 2.0, atol=1e-9)


def test_policy_loss_gradient_zero_where_clipped_in_advantage_direction():
    logp, old, adv, mask = _pg_inputs(requires_grad=True)
    policy_loss(logp, old, adv, mask)[0].backward()
    # d/dlogp of -A*r is -A*r for unclipped tokens, 0 for clipped (a, c, h) and padding (g)
    expected = [[0.0, -0.5, 0.0, 1.5], [-2.2, 8.0, 0.0, 0.0]]
    close(logp.grad, [[g / 7.0 for g in row] for row in expected], atol=1e-9)

    logp, old, adv, mask = _pg_inputs(requires_grad=True)
    policy_loss(logp, old, adv, mask, dual_clip=3.0)[0].backward()
    expected[1][1] = 0.0  # f is now the constant -A*c
    close(logp.grad, [[g / 7.0 for g in row] for row in expected], atol=1e-9)


# ----------------------------------------------------------------------------- value loss

# tokens (v, old, R), clip 0.5:
#   1: v=1,  old=0.8, R=2  -> v_clip=1.0;  (1)^2 vs (1)^2      -> 1    (tie)
#   2: v=2,  old=1,   R=0  -> v_clip=1.5;  4 vs 2.25            -> 4
#   3: v=2,  old=1,   R=3  -> v_clip=1.5;  1 vs 2.25            -> 2.25 clipped
#   4: v=-1, old=0,   R=0  -> v_clip=-0.5; 1 vs 0.25            -> 1
#   5: v=-1, old=0,   R=-2 -> v_clip=-0.5; 1 vs 2.25            -> 2.25 clipped
#   6: padding
VF_V = [[1.0, 2.0, 2.0], [-1.0, -1.0, 100.0]]
VF_OLD = [[0.8, 1.0, 1.0], [0.0, 0.0, 0.0]]
VF_R = [[2.0, 0.0, 3.0], [0.0, -2.0, 0.0]]
VF_M = [[1, 1, 1], [1, 1, 0]]


def test_value_loss_clipped():
    loss, stats = value_loss(t(VF_V), t(VF_OLD), t(VF_R), t(VF_M), clip_range=0.5)
    close(loss, 0.5 * (1.0 + 4.0 + 2.25 + 1.0 + 2.25) / 5.0, atol=1e-12)  # 1.05
    close(stats["vf_clipfrac"], 2.0 / 5.0)


def test_value_loss_unclipped():
    # clip range wide enough that no token is clipped: 0.5 * mean (v-R)^2 = 0.5 * (1+4+1+1+1)/5
    for clip in (10.0, None):
        loss, stats = value_loss(t(VF_V), t(VF_OLD), t(VF_R), t(VF_M), clip_range=clip)
        close(loss, 0.5 * (1.0 + 4.0 + 1.0 + 1.0 + 1.0) / 5.0, atol=1e-12)
        close(stats["vf_clipfrac"], 0.0)


def test_value_loss_gradient_zero_where_clipped():
    v = t(VF_V).requires_grad_(True)
    value_loss(v, t(VF_OLD), t(VF_R), t(VF_M), clip_range=0.5)[0].backward()
    # 0.5 * d/dv (v-R)^2 / 5 = (v-R)/5 for unclipped tokens; 0 for clipped (3, 5) and padding
    close(v.grad, [[-1.0 / 5, 2.0 / 5, 0.0], [-1.0 / 5, 0.0, 0.0]], atol=1e-12)


# ----------------------------------------------------------------------------- logprobs / entropy


def test_uniform_distribution_logprob_and_entropy():
    V = 5
    logits = torch.full((2, 3, V), 0.3)
    labels = torch.tensor([[0, 4, 2], [1, 3, 0]])
    close(logprobs_from_logits(logits, labels), torch.full((2, 3), -math.log(V)), atol=1e-6)
    close(entropy_from_logits(logits), torch.full((2, 3), math.log(V)), atol=1e-6)


def test_three_way_distribution():
    # logits [0, ln 2, ln 3] -> p = [1/6, 2/6, 3/6]
    logits = t([[[0.0, math.log(2.0), math.log(3.0)]] * 3])
    labels = torch.tensor([[0, 1, 2]])
    close(logprobs_from_logits(logits, labels), [[math.log(1 / 6), math.log(2 / 6), math.log(3 / 6)]], atol=1e-12)
    h = math.log(6.0) / 6.0 + math.log(3.0) / 3.0 + math.log(2.0) / 2.0  # ~1.0114042
    close(entropy_from_logits(logits), [[h, h, h]], atol=1e-12)
    # shift invariance (large offset would overflow a naive exp)
    close(entropy_from_logits(logits + 1000.0), [[h, h, h]], atol=1e-9)
    close(logprobs_from_logits(logits + 1000.0, labels)[0, 2], math.log(0.5), atol=1e-9)


def test_low_precision_input_and_masked_vocab():
    logits = t([[[0.0, math.log(2.0), math.log(3.0)]], [[0.0, 0.0, 0.0]]], torch.bfloat16)
    lp = logprobs_from_logits(logits, torch.tensor([[2], [1]]))
    assert lp.dtype == torch.float32
    close(lp, [[math.log(0.5)], [-math.log(3.0)]], atol=1e-2)
    ent = entropy_from_logits(logits)
    assert ent.dtype == torch.float32
    close(ent, [[1.0114042], [math.log(3.0)]], atol=1e-2)
    # -inf logits (masked vocabulary) contribute nothing: entropy of [1/2, 1/2] is ln 2
    masked = t([[0.0, 0.0, float("-inf")]])
    close(entropy_from_logits(masked), [math.log(2.0)], atol=1e-12)
    close(logprobs_from_logits(masked, torch.tensor([1])), [-math.log(2.0)], atol=1e-12)


def test_logprobs_gradient_is_onehot_minus_softmax():
    logits = t([[0.0, math.log(2.0), math.log(3.0)]]).requires_grad_(True)
    logprobs_from_logits(logits, torch.tensor([1])).sum().backward()
    close(logits.grad, [[-1 / 6, 1 - 2 / 6, -3 / 6]], atol=1e-12)


# ----------------------------------------------------------------------------- policy-loss registry


def test_policy_loss_registry_has_one_signature():
    from algos.losses import POLICY_LOSSES

    assert {"vanilla", "gspo"} <= set(POLICY_LOSSES)
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    for fn in POLICY_LOSSES.values():
        pg, stats = fn(logp, logp.detach(), torch.ones(1, 2), torch.ones(1, 2), epsilon_low=0.2,
                       epsilon_high=None, dual_clip=None)
        assert pg.shape == (1, 2) and {"clipfrac", "approx_kl"} <= set(stats)
    with pytest.raises(ValueError, match="registered"):
        policy_loss(logp, logp, torch.ones(1, 2), torch.ones(1, 2), loss="nope")


def test_gspo_sequence_ratio_and_clipping_hand_computed():
    """Two sequences of 2 and 1 valid tokens. log s_0 = (0.5 + (-0.1)) / 2 = 0.2, log s_1 = -0.5.
    eps 0.1: s_0 = e^0.2 = 1.2214 > 1.1 with A = +1 -> clipped at 1.1 (no gradient);
    s_1 = e^-0.5 = 0.6065 < 0.9 with A = -1 -> -A * clip = 0.9 > -A * s = 0.6065: clipped too, but
    for A = +2 (row 1 below) the unclipped term -2 * 0.6065 is the larger one and carries the gradient."""
    old = torch.tensor([[-1.0, -2.0], [-1.0, 0.0]])
    logp = (old + torch.tensor([[0.5, -0.1], [-0.5, 7.0]])).requires_grad_(True)  # 7.0 sits on padding
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    adv = torch.tensor([[1.0, 1.0], [2.0, 2.0]])
    loss, stats = policy_loss(logp, old, adv, mask, epsilon_low=0.1, agg_mode="seq-mean-token-mean", loss="gspo")
    s0, s1 = math.exp(0.2), math.exp(-0.5)
    # row 0: max(-1 * s0, -1 * 1.1) = -1.1 per token; row 1: max(-2 * s1, -2 * 0.9) = -2 * s1
    assert float(loss.detach()) == pytest.approx((-1.1 + -2 * s1) / 2, rel=1e-6)
    loss.backward()
    # row 0 clipped: no gradient; row 1: d/dlogp_t of -A * s1 * exp(logp_t - sg logp_t) = -A * s1 / 2 (seq-mean)
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 0.0], [-2 * s1 / 2, 0.0]]))
    assert float(stats["clipfrac"]) == pytest.approx(2 / 3)  # the 2 tokens of row 0 of 3 valid tokens
    # token-level on the same input: e^0.5 is clipped (-1.1), e^-0.1 = 0.905 is not (-0.905)
    vanilla, _ = policy_loss(logp.detach(), old, adv, mask, epsilon_low=0.1, agg_mode="seq-mean-token-mean")
    assert float(vanilla) == pytest.approx(((-1.1 - math.exp(-0.1)) / 2 + -2 * s1) / 2, rel=1e-6)
    with pytest.raises(ValueError, match="GSPO"):
        policy_loss(logp, old, adv, mask, dual_clip=3.0, loss="gspo")


def test_aggregate_with_a_global_denominator():
    """A micro-batch's numerator over the whole batch's denominator: the shares add up to the
    aggregate of the whole batch, in every mode."""
    from algos.losses import aggregation_denominator

    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [5.0, 6.0, 0.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0], [0, 0, 0]])
    for mode in AGG_MODES:
        whole = aggregate(loss, mask, mode, max_len=4)
        parts = [slice(0, 1), slice(1, 4)]
        total = sum(aggregation_denominator(mask[p], mode, 4) for p in parts)
        assert float(total) == float(aggregation_denominator(mask, mode, 4))
        shares = sum(aggregate(loss[p], mask[p], mode, 4, denominator=total) for p in parts)
        assert float(shares) == pytest.approx(float(whole)), mode
    # the case: 8 tokens on one process, 48 on the other -> each token weighs 1/56
    assert float(aggregate(torch.ones(1, 8), torch.ones(1, 8), "token-mean", denominator=56.0)) == pytest.approx(8 / 56)


def test_whitening_with_a_reduction_uses_global_statistics():
    """Two halves whitened with a shared sum equal the whole batch whitened at once."""
    x = torch.tensor([[1.0, 5.0, 2.0], [0.5, -1.0, 3.0], [7.0, 2.0, 2.0], [0.0, 1.0, -4.0]])
    m = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]]).float()
    halves = [slice(0, 1), slice(1, 4)]
    whole = masked_whiten(x, m)
    for h in halves:
        other = [o for o in halves if o != h][0]
        # reduce(t) = t + the other half's matching statistic: recompute it on the other half
        stats = iter([m[other].sum(), (x[other] * m[other]).sum()])
        def reduce(t, stats=stats, h=h, other=other):
            try:
                return t + next(stats)
            except StopIteration:
                mean = (x * m).sum() / m.sum()
                return t + ((x[other] - mean) ** 2 * m[other]).sum()
        torch.testing.assert_close(masked_whiten(x[h], m[h], reduce=reduce) * m[h], whole[h] * m[h])
