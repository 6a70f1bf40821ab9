"""Shared-prompt forward (Prefix Grouper): each distinct prompt runs once, its completions on its KV
cache; log-probs, gradients and a whole training step equal the row-by-row pass."""
from __future__ import annotations

import pytest
import torch

from algos.logprobs import logprobs_from_hidden
from algos.models import load_causal_lm, output_head
from algos.shared_prompt import distinct_prompts, shared_prompt_forward
from conftest import make_tiny_model
from test_trainer import make_config, read_metrics, weights


def test_distinct_prompts_in_order_of_first_appearance():
    ids = torch.tensor([[0, 5, 6], [7, 8, 9], [0, 5, 6], [7, 8, 9], [0, 0, 6]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1], [0, 1, 1], [1, 1, 1], [0, 1, 1]])
    first, inverse = distinct_prompts(ids, mask)
    assert first.tolist() == [0, 1, 4]
    assert inverse.tolist() == [0, 1, 0, 1, 2]
    # the same ids under another mask are another prompt (a pad id that is also a real token)
    first, inverse = distinct_prompts(torch.zeros(2, 2, dtype=torch.long), torch.tensor([[0, 1], [1, 1]]))
    assert first.tolist() == [0, 1] and inverse.tolist() == [0, 1]


@pytest.fixture(scope="module")
def prefix_model(tmp_path_factory):
    """Large initial weights: outputs depend on the whole prefix, so a wrong cache or position shows."""
    return str(make_tiny_model(tmp_path_factory.mktemp("prefix-llama"), seed=1, initializer_range=0.3))


def _batch():
    """Two prompts (left-padded, lengths 5 and 3), three completions each (right-padded)."""
    g = torch.Generator().manual_seed(0)
    prompts = torch.tensor([[11, 12, 13, 14, 15], [0, 0, 21, 22, 23]])
    prompt_masks = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    rows = [0, 1, 0, 1, 1, 0]
    response = torch.randint(30, 200, (6, 4), generator=g)
    response_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]])
    return prompts[rows], prompt_masks[rows], response * response_mask, response_mask


def _logprobs_and_grads(model, shared: bool):
    prompt, prompt_mask, response, response_mask = _batch()
    model.zero_grad()
    head = output_head(model)
    if shared:
        hidden = shared_prompt_forward(model, prompt, prompt_mask, response, response_mask).hidden_states[-1]
    else:
        mask = torch.cat([prompt_mask, response_mask], dim=1)
        out = model(input_ids=torch.cat([prompt, response], dim=1), attention_mask=mask,
                    position_ids=(mask.cumsum(dim=1) - 1).clamp(min=0), use_cache=False,
                    logits_to_keep=torch.empty(0, dtype=torch.long), output_hidden_states=True)
        hidden = out.hidden_states[-1][:, -(response.shape[1] + 1):]
    logp = logprobs_from_hidden(hidden[:, :-1], head, response, temperature=0.7) * response_mask
    (logp.sum() / response_mask.sum()).backward()
    return logp.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_shared_prompt_forward_equals_the_row_by_row_pass(prefix_model):
    model = load_causal_lm(prefix_model, dtype=torch.float32)
    model.train()
    logp, grads = _logprobs_and_grads(model, shared=False)
    shared_logp, shared_grads = _logprobs_and_grads(model, shared=True)
    assert logp.abs().sum() > 0
    torch.testing.assert_close(shared_logp, logp, atol=1e-5, rtol=1e-5)
    assert shared_grads.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(shared_grads[name], grads[name], atol=1e-6, rtol=1e-4)


def test_a_training_step_is_the_same_with_and_without_shared_prompts(prefix_model, tmp_path, monkeypatch):
    """GRPO, 2 prompts x 4 completions in micro-batches of 4 rows sorted by length: the same update."""
    import algos.trainer
    from algos.trainer import RLTrainer

    calls = []
    monkeypatch.setattr(algos.trainer, "shared_prompt_forward",
                        lambda *a, **k: calls.append(len(a[1])) or shared_prompt_forward(*a, **k))
    runs = {}
    for shared in (True, False):
        out = tmp_path / str(shared)
        calls.clear()
        RLTrainer(make_config(prefix_model, out, max_steps=1, per_device_train_batch_size=4,
                              gradient_accumulation_steps=2, shared_prompt_forward=shared)).train()
        runs[shared] = weights(out / "final")
        assert bool(calls) == shared  # the update's micro-batches took the shared path
    base = weights(prefix_model)
    assert any(not torch.equal(runs[True][k], base[k]) for k in base)
    for k in base:
        torch.testing.assert_close(runs[True][k], runs[False][k], atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("critic_backbone", ["shared", "separate"])
def test_a_ppo_step_is_the_same_with_and_without_shared_prompts(prefix_model, tmp_path, monkeypatch, critic_backbone):
    """PPO's actor-critic, 2 prompts x 4 completions in one micro-batch: the policy's pass runs each prompt once
    (the values of a shared critic read the same hidden states; a separate critic's backbone shares prompts
    too) and the update is the same."""
    import algos.value_model
    from algos.trainer import RLTrainer

    calls = []
    monkeypatch.setattr(algos.value_model, "shared_prompt_forward",
                        lambda *a, **k: calls.append(len(a[1])) or shared_prompt_forward(*a, **k))
    runs, losses = {}, {}
    for shared in (True, False):
        out = tmp_path / str(shared)
        calls.clear()
        RLTrainer(make_config(prefix_model, out, algorithm="ppo", critic_backbone=critic_backbone, max_steps=1,
                              num_generations=4, per_device_train_batch_size=8, gradient_accumulation_steps=1,
                              shared_prompt_forward=shared)).train()
        runs[shared] = weights(out / "final")
        losses[shared] = [v for m in read_metrics(out) if "loss/value" in m for v in (m["loss/policy"], m["loss/value"])]
        assert set(calls) == ({8} if shared else set())  # the actor-critic's passes took the shared path
    assert losses[True] and losses[True] == pytest.approx(losses[False], rel=1e-5, abs=1e-7)
    base = weights(prefix_model)
    assert any(not torch.equal(runs[True][k], base[k]) for k in base)
    for k in base:  # Adam's first step (lr 1e-3) turns rounding in a near-zero gradient into up to 1e-5
        torch.testing.assert_close(runs[True][k], runs[False][k], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("critic_backbone", ["shared", "separate"])
def test_actor_critic_values_and_gradients_are_the_same_with_shared_prompts(prefix_model, critic_backbone,
                                                                            monkeypatch):
    """The critic's values (a non-zero head, so they depend on the hidden states) and every gradient,
    policy and critic backbone, equal the row-by-row pass; a separate critic's backbone shares prompts too."""
    import algos.value_model
    from algos.value_model import ActorCritic

    bare = []
    monkeypatch.setattr(algos.value_model, "shared_prompt_forward",
                        lambda *a, **k: bare.append(k.get("bare_decoder", False)) or shared_prompt_forward(*a, **k))

    torch.manual_seed(0)
    critic = None if critic_backbone == "shared" else load_causal_lm(prefix_model, dtype=torch.float32).get_decoder()
    model = ActorCritic(load_causal_lm(prefix_model, dtype=torch.float32), critic).train()
    torch.nn.init.normal_(model.value_head.weight, std=0.5)
    prompt, prompt_mask, response, response_mask = _batch()
    ids, mask = torch.cat([prompt, response], dim=1), torch.cat([prompt_mask, response_mask], dim=1)
    positions, keep = (mask.cumsum(dim=1) - 1).clamp(min=0), response.shape[1] + 1
    results = {}
    for shared in (False, True):
        model.zero_grad()
        split = (prompt, prompt_mask, response, response_mask, distinct_prompts(prompt, prompt_mask)) if shared else None
        out, values = model(ids, mask, positions, keep, logits_to_keep=torch.empty(0, dtype=torch.long), split=split)
        logp = logprobs_from_hidden(out.hidden_states[-1][:, -keep:-1], output_head(model.policy), response,
                                     temperature=0.7)
        ((logp * response_mask).sum() + (values[:, :-1] * response_mask).sum()).backward()
        valid = torch.cat([torch.ones_like(response_mask[:, :1]), response_mask], dim=1).bool()  # not padding
        results[shared] = values.detach()[valid], {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    (values, grads), (shared_values, shared_grads) = results[False], results[True]
    assert bare == ([False] if critic_backbone == "shared" else [False, True])  # the policy, then the critic
    assert values.abs().sum() > 0
    torch.testing.assert_close(shared_values, values, atol=1e-5, rtol=1e-5)
    assert shared_grads.keys() == grads.keys()
    assert any(n.startswith("critic_backbone.") for n in grads) == (critic_backbone == "separate")
    for name in grads:
        # fp32 sums in another order differ by about 1e-6 of a gradient's scale, which reaches 60 here (the
        # embeddings): a fixed atol of 1e-5 failed on one element of 1.5 M on an AMD EPYC (3.2e-5 off 60)
        scale = grads[name].abs().max().item()
        torch.testing.assert_close(shared_grads[name], grads[name], atol=max(1e-5, 4e-6 * scale), rtol=1e-4)
