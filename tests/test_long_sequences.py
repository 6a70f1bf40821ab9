"""Memory for long sequences: chunked log-probs / entropies from hidden states, token-budget micro-batches."""
from __future__ import annotations

import copy

import pytest
import torch

from algos.logprobs import entropy_from_hidden, entropy_from_logits, logprobs_from_hidden, logprobs_from_logits
from algos.micro_batching import padded_tokens, token_budget_batches
from algos.trainer import RLTrainer
from test_performance import make_config


def _case(seed=0, batch=3, length=37, hidden=16, vocab=101, bias=False):
    """Hidden states, an output layer (a Linear with random weights) and labels."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, length, hidden, generator=g)
    head = torch.nn.Linear(hidden, vocab, bias=bias)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, hidden, generator=g) * 0.5)
        if bias:
            head.bias.copy_(torch.randn(vocab, generator=g))
    y = torch.randint(0, vocab, (batch, length), generator=g)
    return h, head, y


def _full(h, head, y, temperature):
    logits = head(h).float() / temperature
    return logprobs_from_logits(logits, y), entropy_from_logits(logits)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.3])
@pytest.mark.parametrize("chunk", [1, 5, 1024])
@pytest.mark.parametrize("bias", [False, True])
def test_chunked_logprobs_and_entropy_equal_full_logits(temperature, chunk, bias):
    h, head, y = _case(bias=bias)
    want_logp, want_h = _full(h, head, y, temperature)
    got_logp = logprobs_from_hidden(h, head, y, temperature=temperature, chunk_size=chunk)
    got_h = entropy_from_hidden(h, head, temperature=temperature, chunk_size=chunk)
    assert got_logp.shape == y.shape and got_logp.dtype == torch.float32
    torch.testing.assert_close(got_logp, want_logp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_h, want_h, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("bias", [False, True])
def test_chunked_logprobs_gradients_equal_full_logits(temperature, bias):
    h, head, y = _case(seed=1, bias=bias)
    weights = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))  # a loss that weights tokens
    grads = []
    for chunked in (False, True):
        hh, hd = h.clone().requires_grad_(True), copy.deepcopy(head)
        if chunked:
            logp = logprobs_from_hidden(hh, hd, y, temperature=temperature, chunk_size=7)
        else:
            logp = _full(hh, hd, y, temperature)[0]
        (logp * weights).sum().backward()
        grads.append([hh.grad] + [p.grad for p in hd.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_chunked_logprobs_hold_one_chunk_of_logits_at_a_time():
    """The output layer only ever sees chunk_size rows, in the forward and in the backward's recompute."""
    h, head, y = _case(length=40)
    rows = []
    head.register_forward_hook(lambda mod, inp, out: rows.append(inp[0].shape[0]))
    hh = h.clone().requires_grad_(True)
    logp = logprobs_from_hidden(hh, head, y, chunk_size=16)
    assert rows == [16] * 7 + [8]  # 3 x 40 = 120 rows
    logp.sum().backward()
    assert sorted(rows[8:]) == [8] + [16] * 7  # recomputed one chunk at a time (last chunk first)
    assert torch.isfinite(hh.grad).all()
    rows.clear()
    logprobs_from_hidden(hh, head, y, chunk_size=120).sum().backward()
    assert rows == [120]  # a single chunk is kept for the backward, not recomputed


def test_chunked_logprobs_under_bf16_autocast_match_the_model_head():
    """Under autocast the chunk's matmul runs in bf16, as the model's own lm_head would."""
    h, head, y = _case(seed=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = logprobs_from_logits(head(h).float(), y)
        got = logprobs_from_hidden(h, head, y, chunk_size=8)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    hh = h.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logprobs_from_hidden(hh, head, y, chunk_size=8).sum().backward()
    assert torch.isfinite(hh.grad).all() and torch.isfinite(head.weight.grad).all()
    assert head.weight.grad.dtype == torch.float32


def test_chunked_logprobs_on_a_real_model_head(tiny_model_path):
    """From the model's last hidden state (hidden_states[-1], after the final norm) and its output
    layer, the log-probs equal those of the model's own logits."""
    from algos.models import load_causal_lm, output_head

    model = load_causal_lm(tiny_model_path).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
    got = logprobs_from_hidden(out.hidden_states[-1][:, :-1], output_head(model), ids[:, 1:], temperature=0.8)
    want = logprobs_from_logits(out.logits[:, :-1].float() / 0.8, ids[:, 1:])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_output_head_declines_models_that_change_their_logits(tiny_model_path):
    from algos.models import load_causal_lm, output_head

    model = load_causal_lm(tiny_model_path)
    assert output_head(model) is model.lm_head
    model.config.final_logit_softcapping = 30.0  # Gemma-2
    assert output_head(model) is None


def test_chunked_logprobs_refuse_mismatched_shapes():
    h, head, y = _case()
    with pytest.raises(ValueError, match="do not match"):
        logprobs_from_hidden(h, head, y[:, :-1])
    with pytest.raises(ValueError, match="temperature"):
        logprobs_from_hidden(h, head, y, temperature=0.0)


TRAINER_CASES = {
    "grpo-T0.7": dict(temperature=0.7),
    "grpo-kl-reference": dict(beta=0.1),
    "grpo-checkpointing": dict(gradient_checkpointing=True),
    "lora": dict(use_peft=True, lora_target_modules="q_proj,v_proj", beta=0.1),
    "ppo-separate-critic": dict(algorithm="ppo", critic_backbone="separate"),
    "ppo-shared-critic": dict(algorithm="ppo", critic_backbone="shared"),
    "bf16-kl-reference": dict(bf16=True, beta=0.1),
}


@pytest.mark.parametrize("case", list(TRAINER_CASES))
def test_trainer_step_with_chunked_logprobs_equals_full_logits(tiny_model_path, tmp_path, case, monkeypatch,
                                                               fresh_accelerate_state):
    """One training step with --logprobs_chunk_size 3 and with full logits (0): the same losses, KL,
    entropy and gradient norm, and the same gradients at the optimizer step. The chunked step never takes the
    full-logits path."""
    import algos.logprobs

    results = []
    for chunk in (0, 3):
        if chunk:
            def refuse(*args, **kwargs):
                raise AssertionError("full logits computed with logprobs_chunk_size > 0")

            monkeypatch.setattr(algos.logprobs, "logprobs_from_logits", refuse)
        trainer = RLTrainer(make_config(tiny_model_path, tmp_path / str(chunk), logprobs_chunk_size=chunk,
                                        **TRAINER_CASES[case]))
        grads, step = [], trainer.optimizer.step

        def recording_step(*args, **kwargs):
            grads.extend(p.grad.clone() for p in trainer.model.parameters() if p.grad is not None)
            return step(*args, **kwargs)

        trainer.optimizer.step = recording_step
        metrics = trainer.training_step()
        results.append((metrics, grads))
    (full, w_full), (chunked, w_chunked) = results
    keys = [k for k in full if k.startswith(("loss/", "kl", "entropy", "grad_norm", "values/", "ratio"))]
    assert "loss/policy" in keys and "grad_norm" in keys and full["grad_norm"] > 0
    for key in keys:
        assert chunked[key] == pytest.approx(full[key], rel=1e-4, abs=1e-6), key
    assert len(w_full) == len(w_chunked) > 0
    # bf16 matmuls over a chunk and over the whole sequence round differently (2.4e-4 at most seen)
    atol = 1e-3 if TRAINER_CASES[case].get("bf16") else 1e-6
    for a, b in zip(w_full, w_chunked):
        torch.testing.assert_close(b, a, atol=atol, rtol=1e-4)


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
