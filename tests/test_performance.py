"""The speed levers leave the numbers alone: the finished-row-dropping sampler draws the same tokens
as model.generate and records true log-probs, padding trims and length-sorted micro-batches give
the same log-probs, and a training step computes the same losses; bf16 and gradient checkpointing
run on CPU."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from algos.batch import RolloutBatch
from algos.config import RLConfig
from algos.data import build_prompt
from algos.logprobs import entropy_from_logits, logprobs_from_logits
from algos.models import load_causal_lm, load_tokenizer
from algos.rollout import HFGenerateEngine, SamplingParams
from algos.rollout.sampler import sample_dropping_finished
from algos.trainer import RLTrainer, UpdateInputs, length_buckets, position_ids_from_mask, trim_padding
from plain_settings import PLAIN

REWARDS = str(Path(__file__).parent / "rewards_for_tests.py")
QUESTIONS = ("What is 2 + 3?", "Name a colour, briefly please.")


def make_config(model_path, out, **overrides) -> RLConfig:
    values = dict(PLAIN, model_name_or_path=model_path, output_dir=str(out), max_steps=1, num_generations=4,
                  per_device_train_batch_size=8, max_completion_length=8, report_to="none",
                  num_eval_samples=0, reward=f"{REWARDS}:length_reward", learning_rate=1e-3,
                  log_completions_steps=0, seed=3)
    values.update(overrides)
    return RLConfig(**values)


@pytest.fixture(scope="module")
def tiny(tiny_model_path):
    tok = load_tokenizer(tiny_model_path)
    return tok, load_causal_lm(tiny_model_path), [build_prompt(tok, q) for q in QUESTIONS]


def rollout(tok, model, prompts, drop_finished, temperature=0.7, seed=0, n=3, max_new_tokens=12):
    engine = HFGenerateEngine(tok, SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                                                  drop_finished=drop_finished))
    torch.manual_seed(seed)
    return engine.generate(model, prompts, num_generations=n)


def test_sampler_draws_what_generate_draws(tiny, monkeypatch):
    """With generate's multinomial draw and the same seed: the same tokens and (to float rounding)
    log-probs and entropies as model.generate + BehaviourStats (shared prefill included), up to
    the first step at which some row finished."""
    import algos.rollout.sampler

    monkeypatch.setattr(algos.rollout.sampler, "draw_token", lambda probs: torch.multinomial(probs, 1).squeeze(1))
    tok, model, prompts = tiny
    old, new = rollout(tok, model, prompts, False), rollout(tok, model, prompts, True)
    finished = (old.response_mask == 0).any(dim=0).nonzero()
    upto = int(finished[0]) + 1 if len(finished) else old.response_ids.shape[1]
    assert torch.equal(old.response_ids[:, :upto], new.response_ids[:, :upto])
    torch.testing.assert_close(old.logprobs[:, :upto], new.logprobs[:, :upto], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(old.entropies[:, :upto], new.entropies[:, :upto], atol=1e-5, rtol=1e-5)
    if not len(finished):  # no early finish: the whole batches agree
        assert torch.equal(old.response_mask, new.response_mask) and old.completions == new.completions


def test_inverse_cdf_draws_follow_the_distribution():
    from algos.rollout.sampler import draw_token

    probs = torch.tensor([[0.5, 0.0, 0.3, 0.2], [0.0, 0.0, 0.0, 1.0]]).repeat(20000, 1)
    torch.manual_seed(0)
    tokens = draw_token(probs).view(20000, 2)
    freq = torch.bincount(tokens[:, 0], minlength=4).float() / 20000
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.0, 0.3, 0.2]), atol=0.015, rtol=0)
    assert (tokens[:, 1] == 3).all()


def test_sampler_drops_finished_rows_and_records_true_logprobs(tiny):
    """With half the vocabulary as EOS, rows end at different steps; they leave the decode batch,
    and every recorded log-prob / entropy equals a teacher-forced forward of the whole sequence."""
    tok, model, prompts = tiny
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    ids, mask = enc.input_ids.repeat_interleave(4, 0), enc.attention_mask.repeat_interleave(4, 0)
    rows_seen = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: rows_seen.append(kw["input_ids"].shape[0]),
                                           with_kwargs=True)
    try:
        torch.manual_seed(1)
        eos = list(range(0, len(tok), 3))  # a third of the vocabulary ends a row
        response, logp, ent = sample_dropping_finished(model, ids, mask, max_new_tokens=10, eos_ids=eos,
                                                       pad_id=tok.pad_token_id, temperature=0.7)
    finally:
        hook.remove()
    from algos.rollout import response_mask_from_ids

    response_mask, _ = response_mask_from_ids(response, eos)
    lengths = response_mask.sum(dim=1)
    assert lengths.min() < lengths.max(), "rows should finish at different steps"
    assert rows_seen[0] == 8 and rows_seen[-1] < 8 and rows_seen == sorted(rows_seen, reverse=True)
    assert (logp[response_mask == 0] == 0).all() and (ent[response_mask == 0] == 0).all()
    full_ids, full_mask = torch.cat([ids, response], 1), torch.cat([mask, response_mask], 1)
    with torch.no_grad():
        logits = model(input_ids=full_ids, attention_mask=full_mask,
                       position_ids=position_ids_from_mask(full_mask)).logits[:, ids.shape[1] - 1:-1] / 0.7
    m = response_mask.bool()
    torch.testing.assert_close(logprobs_from_logits(logits, response)[m], logp[m], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(entropy_from_logits(logits)[m], ent[m], atol=1e-4, rtol=1e-4)


def pad_batch(batch: RolloutBatch, left: int, right: int, pad: int) -> RolloutBatch:
    """The same batch with ``left`` extra prompt pad columns and ``right`` extra response ones."""
    f = torch.nn.functional.pad
    return RolloutBatch(
        prompt_ids=f(batch.prompt_ids, (left, 0), value=pad), prompt_mask=f(batch.prompt_mask, (left, 0)),
        response_ids=f(batch.response_ids, (0, right), value=pad), response_mask=f(batch.response_mask, (0, right)),
        logprobs=f(batch.logprobs, (0, right)), entropies=f(batch.entropies, (0, right)),
        group_ids=batch.group_ids, prompts=batch.prompts, completions=batch.completions,
        finish_reasons=batch.finish_reasons, extras=batch.extras)


def reference_logprobs(model, batch: RolloutBatch, temperature: float) -> torch.Tensor:
    """The trainer's forward before the levers: whole padded batch, logits / T, then log-probs."""
    mask = batch.attention_mask
    keep = batch.response_ids.shape[1] + 1
    logits = model(input_ids=batch.input_ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                   logits_to_keep=keep, use_cache=False).logits
    return logprobs_from_logits(logits[:, :-1].float() / temperature, batch.response_ids)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_trimmed_and_length_sorted_forward_keep_logprobs(tiny_model_path, tmp_path, temperature):
    trainer = RLTrainer(make_config(tiny_model_path, tmp_path, temperature=temperature,
                                    per_device_train_batch_size=8))
    tok, model = trainer.tokenizer, trainer.policy
    prompts = [build_prompt(tok, q) for q in QUESTIONS]
    batch = rollout(tok, model, prompts, True, temperature=temperature, n=4)
    padded = pad_batch(batch, left=3, right=4, pad=tok.pad_token_id)
    assert [t.shape[1] for t in trim_padding(padded)[::2]] == [batch.prompt_ids.shape[1], batch.response_ids.shape[1]]
    with torch.no_grad():
        expected = reference_logprobs(model, padded, temperature)
        got = trainer.forward(trainer.model, padded)[0]
        trainer.config.per_device_train_batch_size = 3  # micro-batches of rows sorted by length
        batched = trainer._batched_forward(trainer.model, padded)[0]
    assert got.shape == expected.shape == batched.shape
    m = padded.response_mask.bool()
    torch.testing.assert_close(got[m], expected[m], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched[m], expected[m], atol=1e-5, rtol=1e-5)
    assert (got[:, batch.response_ids.shape[1]:] == 0).all()


def one_step(model_path, out, **overrides) -> tuple[RLTrainer, dict]:
    trainer = RLTrainer(make_config(model_path, out, **overrides))
    return trainer, trainer.training_step()


def test_training_step_numbers_match_generate_rollout(tiny_model_path, tmp_path, monkeypatch):
    """One step from the same seed with our sampler (multinomial draw) and with model.generate:
    same rollout (no early finish in 8 tokens of a random model), so the same rewards,
    advantages, losses."""
    import algos.rollout.sampler

    monkeypatch.setattr(algos.rollout.sampler, "draw_token", lambda probs: torch.multinomial(probs, 1).squeeze(1))
    a, ma = one_step(tiny_model_path, tmp_path / "a", drop_finished_sequences=True)
    b, mb = one_step(tiny_model_path, tmp_path / "b", drop_finished_sequences=False)
    assert torch.equal(a._last_batch.response_ids, b._last_batch.response_ids)
    for key in ("reward/mean", "advantages/abs_mean", "loss/policy", "grad_norm", "entropy"):
        assert ma[key] == pytest.approx(mb[key], rel=1e-5, abs=1e-7), key


def test_gradient_checkpointing_gives_the_same_step(tiny_model_path, tmp_path):
    _, plain = one_step(tiny_model_path, tmp_path / "plain")
    _, ckpt = one_step(tiny_model_path, tmp_path / "ckpt", gradient_checkpointing=True)
    for key in ("loss/policy", "grad_norm", "advantages/abs_mean"):
        assert ckpt[key] == pytest.approx(plain[key], rel=1e-5, abs=1e-7), key


def test_bf16_step_runs_on_cpu(tiny_model_path, tmp_path, fresh_accelerate_state):
    trainer, metrics = one_step(tiny_model_path, tmp_path, bf16=True)
    assert math.isfinite(metrics["loss/policy"]) and metrics["grad_norm"] > 0
    assert metrics["completion_length/mean"] > 0
    assert next(trainer.policy.parameters()).dtype == torch.float32  # fp32 master weights
    assert trainer.optimizer.param_groups[0]["fused"]


def test_fused_adamw_matches_the_per_tensor_loop():
    """The trainer's optimizer is torch's fused AdamW; it updates like the default loop."""
    torch.manual_seed(0)
    start, grads = torch.randn(64, 32), [torch.randn(64, 32) for _ in range(3)]
    out = []
    for fused in (False, True):
        p = start.clone().requires_grad_()
        opt = torch.optim.AdamW([p], lr=1e-2, weight_decay=0.1, fused=fused)
        for g in grads:
            p.grad = g.clone()
            opt.step()
        out.append(p.detach())
    torch.testing.assert_close(out[0], out[1], atol=1e-6, rtol=1e-5)


def test_length_buckets():
    assert length_buckets([10, 11, 12, 13, 14], [100, 40, 90, 76, 74]) == [[10, 12, 13], [14], [11]]
    assert length_buckets([0, 1, 2], [100, 10, 50], min_fill=0.0) == [[0, 2, 1]]


def test_length_bucketed_update_equals_one_pass(tiny_model_path, tmp_path):
    """An update over rows of very different lengths, as length buckets, as buckets under a token
    budget and as one padded pass: the same stats and the same gradients at the optimizer step."""
    results = []
    for min_fill, budget in ((0.9, 0), (0.0, 0), (0.9, 40)):
        trainer = RLTrainer(make_config(tiny_model_path, tmp_path / f"{min_fill}-{budget}", temperature=0.7,
                                        max_tokens_per_micro_batch=budget))
        trainer.bucket_min_fill = min_fill
        tok = trainer.tokenizer
        batch = rollout(tok, trainer.policy, [build_prompt(tok, q) for q in QUESTIONS], True, n=4)
        keep = torch.tensor([1, 12, 3, 9, 2, 12, 6, 4])  # response lengths 1..12
        batch.response_mask = (torch.arange(batch.response_ids.shape[1])[None] < keep[:, None]).long()
        advantages = torch.randn(batch.response_mask.shape, generator=torch.Generator().manual_seed(0))
        if min_fill:
            assert len(length_buckets(list(range(8)), batch.attention_mask.sum(1).tolist(), min_fill)) > 1
        grads, step = [], trainer.optimizer.step

        def recording_step(*a, **kw):
            grads.extend(p.grad.clone() for p in trainer.policy.parameters())
            return step(*a, **kw)

        trainer.optimizer.step = recording_step
        inputs = UpdateInputs(advantages, batch.response_mask.float(), None, None, None, None)
        stats = trainer.update(batch, inputs)
        results.append((stats, grads))
    (single, w2) = results[1]
    for bucketed, w1 in (results[0], results[2]):  # length buckets; buckets cut to <= 40 padded tokens
        for key in single:
            assert bucketed[key] == pytest.approx(single[key], rel=1e-5, abs=1e-6), key
        assert len(w1) == len(w2) > 0
        for a, b in zip(w1, w2):
            torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-4)


def test_bf16_rollout_in_one_autocast_region_gives_the_same_rollout(tiny_model_path, tmp_path,
                                                                     fresh_accelerate_state):
    """trainer.rollout wraps the whole generation in one autocast region (weights cast once):
    the same tokens and log-probs as the per-forward autocast of the prepared model."""
    trainer = RLTrainer(make_config(tiny_model_path, tmp_path, bf16=True))
    torch.manual_seed(0)
    one_region = trainer.rollout(*trainer.next_prompts())
    trainer.prompts_consumed = 0
    torch.manual_seed(0)
    prompts, extras = trainer.next_prompts()
    per_forward = trainer.engine.generate(trainer.policy, prompts, trainer.config.num_generations, extras)
    assert torch.equal(one_region.response_ids, per_forward.response_ids)
    torch.testing.assert_close(one_region.logprobs, per_forward.logprobs, atol=0, rtol=0)
