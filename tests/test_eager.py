"""EAGER: entropy, branching, KV forking, the cap, budget reallocation, metrics, RL rollouts."""
from __future__ import annotations

import math
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

import algos.rollout.eager as eager_mod
from algos.rollout.eager import EagerParams, eager_generate, topk_entropy
from algos.rollout.eager_budget import eager_sample, retry_threshold, split_budget
from algos.rollout.eager_engine import EagerEngine, EagerSettings
from algos.logprobs import logprobs_from_logits
from algos.models import load_tokenizer
from algos.rollout import SamplingParams
from rewards.metrics import majority_answer, paired_pass_difference, sample_metrics
from plain_settings import PLAIN
from script_loader import load_script

PROMPTS = ["What is 2 + 3?", "Name a colour.", "Count to five."]


@pytest.fixture(scope="module")
def tok(tiny_model_path):
    return load_tokenizer(tiny_model_path)


@pytest.fixture(scope="module")
def model(tiny_model_path):
    return AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()


def encode(tok, prompts):
    enc = tok(prompts, return_tensors="pt", padding=True)
    return enc.input_ids, enc.attention_mask


def branch_only_at(monkeypatch, step: int):
    """Make the branching entropy huge at decoding step ``step`` only (call count = step)."""
    calls = {"n": 0}
    real = eager_mod.topk_entropy

    def fake(logits, k):
        h = real(logits, k)
        value = torch.full_like(h, 100.0) if calls["n"] == step else torch.zeros_like(h)
        calls["n"] += 1
        return value

    monkeypatch.setattr(eager_mod, "topk_entropy", fake)


def test_topk_entropy_hand_computed():
    logits = torch.tensor([[math.log(3.0), 0.0, -50.0, -60.0]])
    # top-2 renormalised: p~ = (0.75, 0.25); H = -(0.75 ln 0.75 + 0.25 ln 0.25) = 0.562335
    assert topk_entropy(logits, 2).item() == pytest.approx(0.5623351, abs=1e-6)
    assert topk_entropy(torch.zeros(1, 30), 20).item() == pytest.approx(math.log(20), abs=1e-6)


@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS])
def test_infinite_threshold_is_plain_sampling(model, tok, prompts):
    ids, mask = encode(tok, prompts)
    params = EagerParams(threshold=float("inf"), max_new_tokens=10, temperature=0.7)
    torch.manual_seed(11)
    seqs = eager_generate(model, ids, mask, params, [tok.eos_token_id])
    torch.manual_seed(11)
    ref = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=0.7, top_k=0,
                         top_p=1.0, max_new_tokens=10, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    assert len(seqs) == len(prompts)
    for row, s in enumerate(seqs):
        assert s.prompt_index == row
        assert s.token_ids == ref[row, ids.shape[1]:].tolist()


def test_forced_branch_child_shares_prefix_and_takes_top2(model, tok, monkeypatch):
    k = 4
    branch_only_at(monkeypatch, k)
    ids, mask = encode(tok, PROMPTS[:1])
    params = EagerParams(max_sequences=2, threshold=1.0, max_new_tokens=9, do_sample=False)
    parent, child = eager_generate(model, ids, mask, params, [tok.eos_token_id])
    assert child.parent == 0 and child.fork_step == k
    assert child.token_ids[:k] == parent.token_ids[:k]
    prefix = torch.cat([ids, torch.tensor([parent.token_ids[:k]])], dim=1)
    top2 = model(prefix).logits[0, -1].topk(2).indices.tolist()
    assert parent.token_ids[k] == top2[0] and child.token_ids[k] == top2[1]
    # cost counts generated tokens: the child's k copied prefix tokens are the parent's
    assert parent.generated_tokens == len(parent.token_ids)
    assert child.generated_tokens == len(child.token_ids) - k


def test_kv_forked_child_equals_recomputing_it(model, tok, monkeypatch):
    k, new = 3, 10
    branch_only_at(monkeypatch, k)
    ids, mask = encode(tok, PROMPTS)
    params = EagerParams(max_sequences=2, threshold=1.0, max_new_tokens=new, do_sample=False)
    seqs = eager_generate(model, ids, mask, params, [tok.eos_token_id])
    children = [s for s in seqs if s.parent is not None]
    assert len(children) == len(PROMPTS)
    for child in children:
        row = child.prompt_index
        prompt = ids[row, mask[row].bool()]
        forced = torch.cat([prompt, torch.tensor(child.token_ids[:k + 1])])[None]
        ref = model.generate(input_ids=forced, do_sample=False, max_new_tokens=new - k - 1,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        assert child.token_ids[k + 1:] == ref[0, forced.shape[1]:].tolist()


@pytest.mark.parametrize("cap", [1, 3, 5])
def test_cap_is_never_exceeded(model, tok, cap):
    ids, mask = encode(tok, PROMPTS)
    params = EagerParams(max_sequences=cap, threshold=-1.0, max_new_tokens=8)  # branch whenever allowed
    seqs = eager_generate(model, ids, mask, params, [tok.eos_token_id], generator=torch.Generator().manual_seed(0))
    counts = [sum(s.prompt_index == q for s in seqs) for q in range(len(PROMPTS))]
    assert counts == [cap] * len(PROMPTS)
    for s in seqs:
        assert len(s.token_ids) == len(s.logprobs) == len(s.entropies) <= 8
        assert s.finish_reason in ("stop", "length")


def test_quiet_steps_close_branching(model, tok, monkeypatch):
    branch_only_at(monkeypatch, 5)  # would branch at step 5, but branching closed after 3 quiet steps
    ids, mask = encode(tok, PROMPTS[:1])
    params = EagerParams(max_sequences=4, threshold=1.0, quiet_steps=3, max_new_tokens=8, do_sample=False)
    assert len(eager_generate(model, ids, mask, params, [tok.eos_token_id])) == 1


def test_split_budget_and_retry_thresholds_by_hand():
    assert split_budget(10, [3, 1, 4], 3) == {3: 3, 1: 3, 4: 3}          # 4/3/3 capped at 3
    assert split_budget(7, [0, 2], 24) == {0: 4, 2: 3}                     # remainder to the first
    assert split_budget(2, [5, 6, 7], 8) == {5: 1, 6: 1}                   # zero shares left out
    assert split_budget(0, [1], 8) == {} and split_budget(5, [], 8) == {}
    assert retry_threshold(2.0, 1) == pytest.approx(1.6)
    assert retry_threshold(2.0, 2) == pytest.approx(1.28)
    assert retry_threshold(2.0, 3) == pytest.approx(2.0 * 0.8 ** 3 * 0.9)


def test_full_eager_gives_the_budget_to_unsolved_prompts(model, tok):
    ids, mask = encode(tok, PROMPTS)
    m = 3
    params = EagerParams(max_sequences=m, threshold=float("inf"), max_new_tokens=6)  # init: 1 per prompt
    result = eager_sample(model, ids, mask, params, [tok.eos_token_id], mode="full",
                          verifier=lambda q, seqs: [q == 1] * len(seqs), generator=torch.Generator().manual_seed(1))
    assert result.initial_counts == [1, 1, 1]
    # B = 3*3 - 3 = 6 over the unsolved prompts 0 and 2, at most M = 3 each
    assert result.extra_allowance == {0: 3, 2: 3}
    counts = [len(g) for g in result.per_prompt(3)]
    assert counts == [4, 1, 4]


def test_adapt_gives_the_budget_to_cap_hitting_prompts(model, tok):
    ids, mask = encode(tok, PROMPTS[:2])
    params = EagerParams(max_sequences=2, threshold=float("inf"), max_new_tokens=6)
    result = eager_sample(model, ids, mask, params, [tok.eos_token_id], mode="adapt")
    assert result.extra_allowance == {} and [len(g) for g in result.per_prompt(2)] == [1, 1]
    parallel = eager_sample(model, ids, mask, params, [tok.eos_token_id], mode="parallel")
    assert [len(g) for g in parallel.per_prompt(2)] == [2, 2]
    with pytest.raises(ValueError, match="verifier"):
        eager_sample(model, ids, mask, params, [tok.eos_token_id], mode="full")


def test_sample_metrics_by_hand():
    groups = [["\\boxed{5}", "\\boxed{4}", "\\boxed{4}"],   # pass, majority 4 wrong, rate 1/3
              ["\\boxed{7}", "no answer"],                    # pass, majority 7 right, rate 1/2
              ["\\boxed{1}"]]                                 # fail
    m = sample_metrics(groups, ["5", "7", "2"])
    assert m["pass_at_k"] == pytest.approx(2 / 3)
    assert m["cons_at_k"] == pytest.approx(1 / 3)
    assert m["pass_rate"] == pytest.approx((1 / 3 + 1 / 2 + 0) / 3)
    assert m["samples_per_prompt"] == pytest.approx(2.0)
    assert majority_answer(["\\boxed{ 3 }", "\\boxed{3}", "\\boxed{2}"]) == "3"
    assert majority_answer(["none"]) is None


def test_paired_pass_difference_by_hand():
    pair = paired_pass_difference([True, True, False, False, True], [True, False, True, False, False])
    assert (pair["both"], pair["a_only"], pair["b_only"], pair["neither"]) == (1, 2, 1, 1)
    assert pair["difference"] == pytest.approx(1 / 5)
    # every prompt solved by a only: each resample's difference is 1; equal flags: 0
    assert paired_pass_difference([True] * 3, [False] * 3)["interval"] == (1.0, 1.0)
    assert paired_pass_difference([True, False], [True, False])["interval"] == (0.0, 0.0)
    # two prompts, one a-only: a resample's mean is 0, 0.5 or 1 (1/4, 1/2, 1/4), so the 95% interval is [0, 1]
    assert paired_pass_difference([True, False], [False, False])["interval"] == (0.0, 1.0)
    with pytest.raises(ValueError, match="same prompts"):
        paired_pass_difference([True], [True, False])


def test_engine_logprobs_are_the_policys(model, tok):
    """Behaviour log-probs (also of deterministic fork tokens) equal a fresh forward pass."""
    engine = EagerEngine(tok, SamplingParams(max_new_tokens=8, temperature=0.7),
                         EagerSettings(mode="init", threshold=-1.0), seed=0)
    batch = engine.generate(model, PROMPTS, num_generations=3, extras={"answer": ["5", "red", "5"]})
    assert len(batch) == 9 and batch.group_ids.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert batch.extras["answer"][3] == "red"
    positions = (batch.attention_mask.cumsum(1) - 1).clamp(min=0)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=positions).logits
    t = batch.response_ids.shape[1]
    logp = logprobs_from_logits(logits[:, -t - 1:-1].float() / 0.7, batch.response_ids)
    mask = batch.response_mask.bool()
    torch.testing.assert_close(batch.logprobs[mask], logp[mask], atol=1e-4, rtol=1e-4)


def test_micro_batches_put_empty_ones_first():
    from algos.trainer import micro_batches

    assert micro_batches(list(range(8)), 4) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    parts = micro_batches([5, 6, 7], 4)
    assert parts[0] == [] and sorted(sum(parts, [])) == [5, 6, 7] and parts[-1]


@pytest.mark.parametrize("mode", ["init", "full"])
def test_grpo_with_eager_rollouts_trains_on_variable_groups(tiny_model_path, tmp_path, mode):
    import json
    from pathlib import Path

    from algos.config import RLConfig
    from algos.trainer import RLTrainer

    rewards = str(Path(__file__).parent / "rewards_for_tests.py")
    config = RLConfig(**{**PLAIN, "gradient_accumulation_steps": 2}, model_name_or_path=tiny_model_path,
                      output_dir=str(tmp_path), max_steps=2,
                      num_generations=4, per_device_train_batch_size=4,
                      max_completion_length=8, report_to="none", num_eval_samples=0,
                      reward=f"{rewards}:{'length_reward' if mode == 'init' else 'negative_length'}",
                      learning_rate=1e-3, seed=3, rollout="eager",
                      eager_mode=mode, eager_threshold=-1.0 if mode == "init" else 50.0)
    RLTrainer(config).train()
    steps = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    steps = [m for m in steps if "loss/policy" in m]
    assert [m["step"] for m in steps] == [1, 2]
    for m in steps:
        assert math.isfinite(m["loss/policy"]) and m["grad_norm"] > 0
        # init, theta = -1: every prompt branches to the cap M = 4. full, theta = 50: one sequence
        # per prompt, all unsolved (total reward <= 0), B = 4 * 2 - 2 = 6 -> 3 extra each -> 4.
        assert m["rollout/sequences_per_prompt"] == 4.0


def test_eager_rollout_needs_a_group_algorithm():
    from algos.config import ConfigError, RLConfig

    with pytest.raises(ConfigError, match="--rollout"):
        RLConfig(algorithm="ppo", rollout="eager").validate()


def test_dynamic_threshold_hand_computed():
    """theta_eff = max(theta, 99th percentile of the entropies seen); off or nothing seen: theta."""
    seen = [float(v) for v in range(101)]                      # 0, 1, ..., 100: the 99th percentile is 99
    assert eager_mod._effective_theta(2.0, seen, dynamic=True) == pytest.approx(99.0)
    assert eager_mod._effective_theta(150.0, seen, dynamic=True) == 150.0
    assert eager_mod._effective_theta(2.0, seen, dynamic=False) == 2.0
    assert eager_mod._effective_theta(2.0, [], dynamic=True) == 2.0
    # linear interpolation between order statistics: [1, 2, 3] -> 2 + 0.98 * (3 - 2)
    assert eager_mod._effective_theta(0.0, [3.0, 1.0, 2.0], dynamic=True) == pytest.approx(2.98)


def test_dynamic_threshold_holds_back_branching(tiny_model_path):
    """theta = 0 branches at every step until the cap; with the dynamic threshold a row must beat
    the 99th percentile of what its prompt has seen, so branching comes later and less often."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()
    tok = load_tokenizer(tiny_model_path)
    enc = tok(["What is 2 + 2?", "Name a colour."], return_tensors="pt", padding=True, add_special_tokens=False)
    early = {}
    for dynamic in (False, True):
        params = EagerParams(max_sequences=8, threshold=0.0, max_new_tokens=12, temperature=0.9, dynamic_threshold=dynamic)
        torch.manual_seed(0)
        seqs = eager_generate(model, enc["input_ids"], enc["attention_mask"], params, [tok.eos_token_id])
        forks = [s.fork_step for s in seqs if s.fork_step is not None]
        early[dynamic] = sum(step <= 2 for step in forks)    # forks in the first three steps
        assert forks.count(0) == 2                           # step 0: nothing seen yet, so theta = 0 for both
    assert early[False] == 14                                # 1 -> 2 -> 4 -> 8 sequences per prompt
    assert early[True] < early[False]


def _bench_eager():
    return load_script("scripts/bench_eager.py")


def test_bench_passes_its_options_to_every_method(tiny_model_path, monkeypatch, capsys):
    bench = _bench_eager()
    seen, forks, dynamic = {}, {}, {}
    real = bench.eager_sample

    def recording(model, ids, mask, params, eos, mode="init", **kwargs):
        seen[mode], forks[mode], dynamic[mode] = params.threshold, params.sample_fork, params.dynamic_threshold
        return real(model, ids, mask, params, eos, mode=mode, **kwargs)

    monkeypatch.setattr(bench, "eager_sample", recording)
    common = ["--model", tiny_model_path, "--num_problems", "2", "--m", "2", "--max_new_tokens", "3",
              "--timing_prompts", "0", "--threshold", "2.0"]
    bench.main(common + ["--full_threshold", "2.5"])
    assert seen == {"init": 2.0, "adapt": 2.0, "full": 2.5, "parallel": 2.0}
    out = capsys.readouterr().out
    assert "theta=2.0 (full: 2.5)" in out
    counts = re.search(r"both (\d+), full only (\d+), parallel only (\d+), neither (\d+)", out)
    assert counts and sum(map(int, counts.groups())) == 2    # every problem in exactly one cell
    bench.main(common)  # without it, one theta for every method, as before
    assert seen == {"init": 2.0, "adapt": 2.0, "full": 2.0, "parallel": 2.0}
    assert set(forks.values()) == {False}                    # the reference's top-1 / top-2 forks
    assert set(dynamic.values()) == {False}
    bench.main(common + ["--sample_fork"])
    assert set(forks.values()) == {True}
    assert "sampled forks" in capsys.readouterr().out
    bench.main(common + ["--dynamic_threshold"])             # the reference's default, every method
    assert set(dynamic.values()) == {True} and set(forks.values()) == {False}
    assert "dynamic threshold" in capsys.readouterr().out


def test_bench_refuses_a_negative_threshold(capsys):
    with pytest.raises(SystemExit) as exit_info:
        _bench_eager().parse_args(["--full_threshold", "-1"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "--full_threshold must be an entropy in nats (0 or more), got -1.0")
    assert _bench_eager().parse_args(["--threshold", "0"]).threshold == 0.0  # branch wherever the cap allows
