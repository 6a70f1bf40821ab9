"""Memory for long sequences: chunked log-probs / entropies from hidden states, token-budget micro-batches."""
from __future__ import annotations

import pytest
import torch

from algos.logprobs import entropy_from_hidden, entropy_from_logits, logprobs_from_hidden, logprobs_from_logits
from algos.micro_batching import padded_tokens, token_budget_batches


def _case(seed=0, batch=3, length=37, hidden=16, vocab=101, bias=False):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, length, hidden, generator=g)
    w = torch.randn(vocab, hidden, generator=g) * 0.5
    b = torch.randn(vocab, generator=g) if bias else None
    y = torch.randint(0, vocab, (batch, length), generator=g)
    return h, w, b, y


def _full(h, w, b, y, temperature):
    logits = torch.nn.functional.linear(h, w, b).float() / temperature
    return logprobs_from_logits(logits, y), entropy_from_logits(logits)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.3])
@pytest.mark.parametrize("chunk", [1, 5, 1024])
@pytest.mark.parametrize("bias", [False, True])
def test_chunked_logprobs_and_entropy_equal_full_logits(temperature, chunk, bias):
    h, w, b, y = _case(bias=bias)
    want_logp, want_h = _full(h, w, b, y, temperature)
    got_logp = logprobs_from_hidden(h, w, y, bias=b, temperature=temperature, chunk_size=chunk)
    got_h = entropy_from_hidden(h, w, bias=b, temperature=temperature, chunk_size=chunk)
    assert got_logp.shape == y.shape and got_logp.dtype == torch.float32
    torch.testing.assert_close(got_logp, want_logp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_h, want_h, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("bias", [False, True])
def test_chunked_logprobs_gradients_equal_full_logits(temperature, bias):
    h, w, b, y = _case(seed=1, bias=bias)
    weights = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))  # a loss that weights tokens
    leaves_full = [t.clone().requires_grad_(True) for t in (h, w) + ((b,) if bias else ())]
    leaves_chunk = [t.clone().requires_grad_(True) for t in (h, w) + ((b,) if bias else ())]
    full = _full(leaves_full[0], leaves_full[1], leaves_full[2] if bias else None, y, temperature)[0]
    (full * weights).sum().backward()
    chunked = logprobs_from_hidden(leaves_chunk[0], leaves_chunk[1], y, bias=leaves_chunk[2] if bias else None,
                                   temperature=temperature, chunk_size=7)
    (chunked * weights).sum().backward()
    for a, b_ in zip(leaves_full, leaves_chunk):
        torch.testing.assert_close(b_.grad, a.grad, atol=1e-5, rtol=1e-5)


def test_chunked_logprobs_under_bf16_autocast_match_the_model_head():
    """Under autocast the chunk's matmul runs in bf16, as the model's own lm_head would."""
    h, w, _, y = _case(seed=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = logprobs_from_logits(torch.nn.functional.linear(h, w).float(), y)
        got = logprobs_from_hidden(h, w, y, chunk_size=8)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logprobs_from_hidden(hh, ww, y, chunk_size=8).sum().backward()
    assert torch.isfinite(hh.grad).all() and torch.isfinite(ww.grad).all() and ww.grad.dtype == torch.float32


def test_chunked_logprobs_on_a_real_model_head(tiny_model_path):
    """From the model's last hidden state (hidden_states[-1], after the final norm) and its lm_head, the
    log-probs equal those of the model's own logits."""
    from algos.models import lm_head_params, load_causal_lm

    model = load_causal_lm(tiny_model_path).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
    weight, bias = lm_head_params(model)
    got = logprobs_from_hidden(out.hidden_states[-1][:, :-1], weight, ids[:, 1:], bias=bias, temperature=0.8)
    want = logprobs_from_logits(out.logits[:, :-1].float() / 0.8, ids[:, 1:])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_chunked_logprobs_refuse_mismatched_shapes():
    h, w, _, y = _case()
    with pytest.raises(ValueError, match="do not match"):
        logprobs_from_hidden(h, w, y[:, :-1])
    with pytest.raises(ValueError, match="temperature"):
        logprobs_from_hidden(h, w, y, temperature=0.0)


def test_token_budget_batches_keep_every_group_under_the_budget():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 400, (50,), generator=g).tolist()
    rows = list(range(100, 150))
    by_row = dict(zip(rows, lengths))
    groups = token_budget_batches(rows, lengths, max_tokens=1000)
    assert sorted(r for grp in groups for r in grp) == rows
    assert all(grp for grp in groups)
    assert all(padded_tokens(grp, by_row) <= 1000 for grp in groups)
    # greedy on sorted lengths: a group never could have taken the next group's first row
    for a, b in zip(groups, groups[1:]):
        assert (len(a) + 1) * max(by_row[r] for r in a) > 1000


def test_token_budget_batches_put_an_overlong_row_alone_and_refuse_a_bad_budget():
    assert token_budget_batches([0, 1, 2], [5000, 10, 10], max_tokens=100) == [[0], [1, 2]]
    assert token_budget_batches([], [], max_tokens=10) == []
    with pytest.raises(ValueError, match="budget"):
        token_budget_batches([0], [1], max_tokens=0)
