"""The trainer on a tiny random Llama: every algorithm runs, gradient accumulation is exact,
resume reproduces an uninterrupted run (from either checkpoint layout, with and without LoRA, PPO's
critic included), checkpoints store the weights once, rotate and survive partial saves."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from algos.checkpoint import CheckpointError, list_checkpoints, resolve_resume
from algos.config import RLConfig
from algos.trainer import PromptSampler, RLTrainer, use_cpu_threads
from plain_settings import PLAIN

REWARDS = str(Path(__file__).parent / "rewards_for_tests.py")


def make_config(model_path, out, **overrides) -> RLConfig:
    values = dict(PLAIN, model_name_or_path=model_path, output_dir=str(out), max_steps=2, num_generations=4,
                  per_device_train_batch_size=8, max_completion_length=8, report_to="none",
                  num_eval_samples=4, eval_batch_size=4, reward=f"{REWARDS}:length_reward",
                  learning_rate=1e-3, log_completions_steps=1, seed=3)
    values.update(overrides)
    return RLConfig(**values)


def read_metrics(out) -> list[dict]:
    return [json.loads(line) for line in open(Path(out) / "metrics.jsonl")]


def weights(path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(path) / "model.safetensors"))


def test_step_times_count_every_reward_as_reward_time(tiny_model_path, tmp_path, monkeypatch):
    """The reward stack runs inside sampling (dynamic sampling needs its scores) and REPRO beside the
    log-prob pass: both are reward time, not generation or log-prob time, and the four parts fit in
    the step. The stack waits 0.3 s per sampling round, REPRO's scoring 0.4 s."""
    import time

    real = RLTrainer.repro_process_term
    monkeypatch.setattr(RLTrainer, "repro_process_term",
                        lambda self, batch: time.sleep(0.4) or real(self, batch))
    RLTrainer(make_config(tiny_model_path, tmp_path, max_steps=1, reward=f"{REWARDS}:slow_length_reward,repro",
                          repro_top_k=3, dynamic_sampling=True, dynamic_sampling_max_rounds=2,
                          per_device_train_batch_size=4, gradient_accumulation_steps=2)).train()
    step = next(m for m in read_metrics(tmp_path) if "loss/policy" in m)
    assert step["time/reward_seconds"] >= 0.3 * step["dynamic_sampling/rounds"] + 0.4
    parts = sum(step[f"time/{k}_seconds"] for k in ("generation", "reward", "logprob", "update"))
    assert step["time/generation_seconds"] > 0 and step["time/logprob_seconds"] >= 0
    assert parts <= step["time/step_seconds"] + 1e-3


@pytest.mark.parametrize("algorithm", ["grpo", "ppo", "ppo-shared", "reinforce_pp", "reinforce_pp_baseline"])
def test_two_steps_of_each_algorithm(tiny_model_path, tmp_path, algorithm):
    before = weights(tiny_model_path)
    extra = {"critic_backbone": "shared"} if algorithm == "ppo-shared" else {}
    algorithm = algorithm.split("-")[0]
    RLTrainer(make_config(tiny_model_path, tmp_path, algorithm=algorithm, **extra)).train()
    steps = [m for m in read_metrics(tmp_path) if "loss/policy" in m]
    assert [m["step"] for m in steps] == [1, 2]
    for m in steps:
        assert math.isfinite(m["loss/policy"]) and m["grad_norm"] > 0
        assert m["completion_length/mean"] > 0 and "rewards/length_reward" in m
    if algorithm == "ppo":
        assert all("loss/value" in m for m in steps)
        assert steps[1]["loss/value"] != steps[0]["loss/value"]
    if algorithm in ("ppo", "reinforce_pp", "reinforce_pp_baseline"):  # default beta > 0
        assert all("kl" in m for m in steps)
    after = weights(tmp_path / "final")
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed, "training did not change any weight"
    assert (tmp_path / "final" / "tokenizer_config.json").exists()
    assert (tmp_path / "completions.jsonl").read_text().strip()


def test_gradient_accumulation_matches_one_big_batch(tiny_model_path, tmp_path):
    """8 sequences in one micro-batch == 2 micro-batches of 4 with accumulation (token-mean)."""
    one = make_config(tiny_model_path, tmp_path / "one", max_steps=1, per_device_train_batch_size=8)
    two = make_config(tiny_model_path, tmp_path / "two", max_steps=1, per_device_train_batch_size=4,
                      gradient_accumulation_steps=2)
    RLTrainer(one).train()
    RLTrainer(two).train()
    a, b = weights(tmp_path / "one" / "final"), weights(tmp_path / "two" / "final")
    base = weights(tiny_model_path)
    assert any(not torch.equal(a[k], base[k]) for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-6, rtol=1e-5)


def test_resume_reproduces_uninterrupted_run(tiny_model_path, tmp_path):
    full = tmp_path / "full"
    RLTrainer(make_config(tiny_model_path, full, max_steps=4, save_steps=2,
                          steps_per_generation=2, per_device_train_batch_size=4)).train()
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-2", resumed / "checkpoint-2")
    # the interrupted run had logged steps 1-4; the resumed run keeps steps 1-2 and logs 3-4 once
    shutil.copy(full / "metrics.jsonl", resumed / "metrics.jsonl")
    RLTrainer(make_config(tiny_model_path, resumed, max_steps=4, save_steps=2,
                          steps_per_generation=2, per_device_train_batch_size=4,
                          resume_from_checkpoint="latest")).train()
    expected = {m["step"]: m for m in read_metrics(full) if "loss/policy" in m}
    got = {m["step"]: m for m in read_metrics(resumed) if "loss/policy" in m}
    assert [m["step"] for m in read_metrics(resumed) if "loss/policy" in m] == [1, 2, 3, 4]
    assert sorted(got) == [1, 2, 3, 4]
    for step in (3, 4):
        for key in ("reward/mean", "loss/policy", "completion_length/mean", "grad_norm", "entropy"):
            assert got[step][key] == pytest.approx(expected[step][key], rel=1e-5, abs=1e-7), key
    a, b = weights(full / "final"), weights(resumed / "final")
    for k in a:
        torch.testing.assert_close(a[k], b[k])
    # the weights are stored once, in the HF-format files; Accelerate's state holds the optimizer
    state_files = {p.name for p in (full / "checkpoint-2" / "trainer_state").iterdir()}
    assert "optimizer.bin" in state_files and not any(n.startswith("model") for n in state_files)
    assert json.loads((full / "checkpoint-2" / "trainer_state.json").read_text())["policy_weights"] == "hf"

    # a checkpoint of the earlier layout (the weights inside trainer_state, no marker) resumes the same way
    old = tmp_path / "old"
    shutil.copytree(full / "checkpoint-2", old / "checkpoint-2")
    shutil.copy(full / "checkpoint-2" / "model.safetensors", old / "checkpoint-2" / "trainer_state")
    state = json.loads((old / "checkpoint-2" / "trainer_state.json").read_text())
    del state["policy_weights"]
    (old / "checkpoint-2" / "trainer_state.json").write_text(json.dumps(state))
    RLTrainer(make_config(tiny_model_path, old, max_steps=4, save_steps=2, steps_per_generation=2,
                          per_device_train_batch_size=4, resume_from_checkpoint="latest")).train()
    c = weights(old / "final")
    for k in a:
        torch.testing.assert_close(a[k], c[k])


@pytest.mark.parametrize("critic_backbone", ["separate", "shared"])
def test_ppo_checkpoint_keeps_only_the_critic_in_its_state_and_resumes_exactly(tiny_model_path, tmp_path,
                                                                               critic_backbone):
    ppo = dict(algorithm="ppo", critic_backbone=critic_backbone, max_steps=4, save_steps=2)
    full = tmp_path / "full"
    RLTrainer(make_config(tiny_model_path, full, **ppo)).train()
    checkpoint = full / "checkpoint-2"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["policy_weights"] == "hf"
    critic = load_file(str(checkpoint / "trainer_state" / "model.safetensors"))
    assert "value_head.weight" in critic and not any(k.startswith("policy.") for k in critic)
    assert any(k.startswith("critic_backbone.") for k in critic) == (critic_backbone == "separate")
    resumed = tmp_path / "resumed"
    shutil.copytree(checkpoint, resumed / "checkpoint-2")
    shutil.copy(full / "metrics.jsonl", resumed / "metrics.jsonl")
    RLTrainer(make_config(tiny_model_path, resumed, resume_from_checkpoint="latest", **ppo)).train()
    expected = {m["step"]: m for m in read_metrics(full) if "loss/value" in m}
    got = {m["step"]: m for m in read_metrics(resumed) if "loss/value" in m}
    for step in (3, 4):  # the value loss follows the critic restored from trainer_state/
        for key in ("loss/value", "loss/policy", "reward/mean"):
            assert got[step][key] == pytest.approx(expected[step][key], rel=1e-5, abs=1e-7), key
    a, b = weights(full / "final"), weights(resumed / "final")
    for k in a:
        torch.testing.assert_close(a[k], b[k])


def test_lora_checkpoint_holds_the_adapter_once_resumes_exactly_and_checks_its_base(tiny_model_path, tmp_path):
    lora = dict(use_peft=True, lora_r=4, lora_target_modules="q_proj,v_proj", max_steps=4, save_steps=2)
    full = tmp_path / "full"
    RLTrainer(make_config(tiny_model_path, full, **lora)).train()
    checkpoint = full / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").exists()
    assert not any(p.name.startswith("model") for p in (checkpoint / "trainer_state").iterdir())
    resumed = tmp_path / "resumed"
    shutil.copytree(checkpoint, resumed / "checkpoint-2")
    RLTrainer(make_config(tiny_model_path, resumed, resume_from_checkpoint="latest", **lora)).train()
    a = load_file(str(full / "final" / "adapter_model.safetensors"))
    b = load_file(str(resumed / "final" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and any(k.endswith("lora_B.weight") and a[k].abs().sum() > 0 for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k])

    # the frozen base comes from --model_name_or_path: another base is refused, with what to pass
    from transformers import AutoModelForCausalLM, AutoTokenizer
    other = tmp_path / "other-base"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.add_(0.01)
    model.save_pretrained(other)
    AutoTokenizer.from_pretrained(tiny_model_path).save_pretrained(other)
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(checkpoint, elsewhere / "checkpoint-2")
    with pytest.raises(CheckpointError, match="--model_name_or_path"):
        RLTrainer(make_config(str(other), elsewhere, resume_from_checkpoint="latest", **lora)).train()


def test_fresh_run_in_an_old_output_dir_starts_new_logs(tiny_model_path, tmp_path):
    for _ in range(2):
        RLTrainer(make_config(tiny_model_path, tmp_path, max_steps=2, log_completions_steps=1)).train()
    assert [m["step"] for m in read_metrics(tmp_path) if "loss/policy" in m] == [1, 2]
    samples = [json.loads(line)["step"] for line in open(tmp_path / "completions.jsonl")]
    assert samples and sorted(set(samples)) == [1, 2] and samples == sorted(samples)


def test_checkpoints_rotate_and_partial_saves_are_ignored(tiny_model_path, tmp_path):
    RLTrainer(make_config(tiny_model_path, tmp_path, max_steps=4, save_steps=1, save_total_limit=2)).train()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]
    # A save killed half-way leaves a .tmp directory or a checkpoint without its state file.
    (tmp_path / ".checkpoint-9.tmp").mkdir()
    (tmp_path / "checkpoint-10").mkdir()
    assert resolve_resume(tmp_path, "latest").name == "checkpoint-3"
    state = json.loads((tmp_path / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["step"] == 3 and state["prompts_consumed"] == 3 * 2


def test_a_path_that_is_not_a_checkpoint_is_one_line(tmp_path, capsys):
    from train.cli import main_guard

    with pytest.raises(SystemExit) as exit_info:
        main_guard(lambda: resolve_resume(tmp_path, str(tmp_path / "checkpoint-7")))
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    assert "--resume_from_checkpoint=" in err and "not a complete checkpoint" in err


def test_lora_reference_is_the_base_model(tiny_model_path, tmp_path):
    RLTrainer(make_config(tiny_model_path, tmp_path, use_peft=True, beta=0.1, lora_r=4,
                          lora_target_modules="q_proj,v_proj")).train()
    steps = [m for m in read_metrics(tmp_path) if "loss/policy" in m]
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-7)  # LoRA B starts at 0: policy == base
    assert steps[1]["kl"] > 0
    assert (tmp_path / "final" / "adapter_config.json").exists()


def test_prompt_sampler_is_a_permutation_per_epoch():
    sampler = PromptSampler(5, seed=1)
    first, second = sampler.indices(0, 5), sampler.indices(5, 5)
    assert sorted(first) == sorted(second) == list(range(5))
    assert PromptSampler(5, seed=1).indices(3, 4) == first[3:] + second[:2]


@pytest.mark.parametrize("algorithm", ["grpo", "ppo", "reinforce_pp", "reinforce_pp_baseline"])
def test_repro_reward_in_every_algorithm(tiny_model_path, tmp_path, algorithm):
    config = make_config(tiny_model_path, tmp_path, algorithm=algorithm, max_completion_length=16,
                         reward=f"{REWARDS}:length_reward,repro", repro_top_k=3)
    assert config.outcome_rewards == [f"{REWARDS}:length_reward"] and config.use_repro
    RLTrainer(config).train()
    steps = [m for m in read_metrics(tmp_path) if "loss/policy" in m]
    assert len(steps) == 2
    for m in steps:
        assert m["repro/points_mean"] >= 1 and math.isfinite(m["repro/score_final_mean"])
        assert 0 < m["repro/magnitude_mean"] <= 1 or m["repro/points_mean"] == 1


def test_repro_with_alpha_zero_changes_nothing(tiny_model_path, tmp_path):
    """REPRO scoring is side-effect free: alpha = 0 trains exactly like the outcome reward alone."""
    plain = make_config(tiny_model_path, tmp_path / "plain", max_steps=1, max_completion_length=16)
    zero = make_config(tiny_model_path, tmp_path / "zero", max_steps=1, max_completion_length=16,
                       reward=f"{REWARDS}:length_reward,repro", repro_alpha=0.0)
    RLTrainer(plain).train()
    RLTrainer(zero).train()
    a, b = weights(tmp_path / "plain" / "final"), weights(tmp_path / "zero" / "final")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0)
    with_repro = make_config(tiny_model_path, tmp_path / "on", max_steps=1, max_completion_length=16,
                             reward=f"{REWARDS}:length_reward,repro", repro_alpha=1.0)
    RLTrainer(with_repro).train()
    c = weights(tmp_path / "on" / "final")
    assert any(not torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("ranks_by_entropy", [False, True])
def test_repro_on_an_engine_without_entropies_measures_them_only_when_they_pick_points(
        tiny_model_path, tmp_path, monkeypatch, ranks_by_entropy):
    """vLLM reports no entropies. When REPRO scores every line break (none has more than top_k), the forward
    pass before the update is skipped and the step trains as with it; otherwise that pass supplies them."""
    from rewards.repro import ReproReward

    def run(out, force_pass):
        config = make_config(tiny_model_path, out, max_steps=1, max_completion_length=16,
                             reward=f"{REWARDS}:length_reward,repro", repro_alpha=1.0)
        trainer = RLTrainer(config)
        trainer.engine_entropies = False  # as with vLLM
        passes = []
        forward = trainer._batched_forward
        monkeypatch.setattr(trainer, "_batched_forward", lambda *a, **k: passes.append(1) or forward(*a, **k))
        if force_pass:
            monkeypatch.setattr(ReproReward, "needs_entropies", lambda self, tokenizer, batch: True)
        trainer.train()
        monkeypatch.undo()
        return len(passes), [m for m in read_metrics(out) if "loss/policy" in m][0], weights(Path(out) / "final")

    passes, metrics, trained = run(tmp_path / "run", ranks_by_entropy)
    assert passes == int(ranks_by_entropy)
    assert metrics["entropy"] > 0 and metrics["repro/points_mean"] >= 1
    if not ranks_by_entropy:  # the same step as with the pass (old log-probs equal up to rounding)
        _, with_pass, reference = run(tmp_path / "with_pass", True)
        for key in ("entropy", "loss/policy", "grad_norm", "repro/process_reward_mean"):
            assert metrics[key] == pytest.approx(with_pass[key], rel=1e-4, abs=1e-6), key
        for k in trained:
            torch.testing.assert_close(trained[k], reference[k], atol=2e-5, rtol=0)


def test_cpu_threads_follow_processes_unless_overridden(monkeypatch):
    import os

    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("REPRO_RL_NUM_THREADS", raising=False)
        use_cpu_threads(1)
        assert torch.get_num_threads() == os.cpu_count()
        monkeypatch.setenv("REPRO_RL_NUM_THREADS", "1")
        use_cpu_threads(1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
