"""The colocated vLLM engine: its log-probs against the trainer's, weight sync (full and LoRA), GRPO runs
with --use_vllm (one process and two), and the one-line refusals. Engines run in subprocesses: vLLM
allows one engine per process."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from algos.config import ConfigError, RLConfig
from algos.rollout import SamplingParams
from plain_settings import PLAIN_FLAGS

ROOT = Path(__file__).resolve().parents[1]
needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vLLM not installed (pip install -e .[vllm])")

# fp32 engine against the fp32 trainer forward: measured max |diff| 4.5e-5 over ~600 tokens (T = 1 and 0.7)
LOGPROB_TOLERANCE = 2e-4


def run(cmd, env=None, timeout=900):
    import os

    full_env = {**os.environ, "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=full_env, timeout=timeout)


def probe(*args) -> dict:
    result = run([sys.executable, "tests/vllm_probe.py", *args])
    lines = [l for l in result.stdout.splitlines() if l.startswith("VLLM_PROBE ")]
    assert result.returncode == 0 and lines, result.stderr[-3000:]
    return json.loads(lines[-1][len("VLLM_PROBE "):])


@pytest.fixture(scope="module")
def probe_t07_with_sync():
    return probe("0.7", "--sync")


@pytest.mark.slow
@needs_vllm
@pytest.mark.parametrize("temperature", ["1.0", "0.7"])
def test_vllm_logprobs_equal_the_trainer_forward(temperature, request):
    report = request.getfixturevalue("probe_t07_with_sync") if temperature == "0.7" else probe(temperature)
    assert report["tokens"] > 100
    assert report["max_abs_diff"] < LOGPROB_TOLERANCE, report
    assert report["mean_abs_logprob"] > 0.1  # real sampled tokens, not a degenerate comparison
    assert report["stop_rows_end_with_eos"], report


@pytest.mark.slow
@needs_vllm
@pytest.mark.parametrize("kind", ["full", "lora"])
def test_weight_sync_moves_the_engine_to_the_updated_policy(kind, request):
    report = request.getfixturevalue("probe_t07_with_sync")[kind]
    assert report["policy_change"] > 0.3, report          # the step changed the policy visibly
    assert report["before_vs_old"] < LOGPROB_TOLERANCE    # the engine had the old weights
    assert report["after_vs_new"] < LOGPROB_TOLERANCE     # ... and now has the new ones
    assert report["after_vs_old"] > 0.3                   # (fails when the sync is skipped)


@pytest.mark.slow
@needs_vllm
def test_grpo_two_steps_with_vllm_on_the_default_model(tmp_path):
    out = tmp_path / "run"
    result = run([sys.executable, "train/grpo.py", *PLAIN_FLAGS, "--model_name_or_path", "smollm2-135m-instruct",
                  "--use_vllm", "true", "--reward", "accuracy,format",
                  "--max_steps", "2", "--num_generations", "4", "--per_device_train_batch_size", "8",
                  "--max_completion_length", "24", "--num_eval_samples", "8", "--eval_on_start", "true",
                  "--learning_rate", "1e-5", "--output_dir", str(out), "--report_to", "none"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]  # vLLM's exit hook after our group's end
    assert "held-out accuracy after training" in result.stdout
    steps = [json.loads(l) for l in open(out / "metrics.jsonl")]
    trained = [m for m in steps if "loss/policy" in m]
    assert [m["step"] for m in trained] == [1, 2]
    for key in ("vllm/abs_logprob_diff", "vllm/kl", "vllm/capped_fraction", "vllm/is_weight_mean",
                "time/weight_sync_seconds", "entropy"):
        assert key in trained[0], key
    # step 1 samples with the weights vLLM loaded: fp32 engine, fp32 trainer
    assert trained[0]["vllm/abs_logprob_diff"] < LOGPROB_TOLERANCE
    assert trained[0]["entropy"] > 0.05  # taken from the trainer's forward (vLLM reports none)
    assert (out / "final" / "model.safetensors").exists()


def make_vllm_tiny_model(path: Path) -> Path:
    """A small random Llama whose head size vLLM's CPU attention supports (64)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from algos.models import load_tokenizer

    tokenizer = load_tokenizer(None)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.slow
@needs_vllm
def test_headline_defaults_run_repro_with_vllm(tmp_path):
    """`train/grpo.py --reward repro` with the trainer's defaults (thinking task, vLLM, bf16 where fast, evaluation
    before and after), on a tiny model instead of the thinking default so that nothing is built."""
    model = make_vllm_tiny_model(tmp_path / "tiny")
    out = tmp_path / "run"
    result = run([sys.executable, "train/grpo.py", "--reward", "repro", "--model_name_or_path", str(model),
                  "--max_steps", "1", "--num_generations", "4", "--per_device_train_batch_size", "4",
                  "--max_completion_length", "16", "--num_eval_samples", "4", "--report_to", "none",
                  "--output_dir", str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    for when in ("before", "after"):
        assert f"held-out accuracy {when} training: " in result.stdout and "mean completion" in result.stdout
    state = json.loads((out / "final" / "trainer_state.json").read_text())["config"]
    from algos.device import bf16_is_fast

    expected = ("thinking", True, bf16_is_fast(), True, True)  # bf16 where it is fast (not on an AVX2-only CPU)
    assert (state["dataset"], state["use_vllm"], state["bf16"], state["eval_on_start"],
            state["dynamic_sampling"]) == expected
    step = [json.loads(l) for l in open(out / "metrics.jsonl") if "loss/policy" in l]
    assert len(step) == 1
    assert "vllm/abs_logprob_diff" in step[0] and step[0]["repro/points_mean"] > 0  # vLLM sampled, REPRO scored
    assert "rewards/accuracy" in step[0]  # --reward repro alone: accuracy + REPRO
    assert 1 <= step[0]["dynamic_sampling/rounds"] <= 4  # DAPO's dynamic sampling, on by default


@pytest.mark.slow
@needs_vllm
def test_two_process_run_with_vllm_ends_with_equal_weights(tmp_path):
    model = make_vllm_tiny_model(tmp_path / "tiny")
    out = tmp_path / "run"
    launcher = Path(sys.executable).parent / "accelerate"
    result = run([str(launcher) if launcher.exists() else "accelerate", "launch", "--multi_gpu",
                  "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                  "train/grpo.py", *PLAIN_FLAGS, "--use_vllm", "true", "--model_name_or_path", str(model),
                  "--reward", "format", "--max_steps", "2", "--num_generations", "4",
                  "--per_device_train_batch_size", "8", "--max_completion_length", "8", "--num_eval_samples", "8",
                  "--learning_rate", "1e-3", "--dynamic_sampling", "true", "--dynamic_sampling_max_rounds", "2",
                  "--report_to", "none", "--output_dir", str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    state = json.loads((out / "final" / "trainer_state.json").read_text())
    assert state["num_processes"] == 2
    a, b = state["rank_weight_checksums"]
    assert a == b, "the two processes ended with different weights"
    steps = [json.loads(l) for l in open(out / "metrics.jsonl") if "vllm/abs_logprob_diff" in l]
    assert len(steps) == 2
    # dynamic sampling ran its rounds in step on both processes, each with its own engine
    assert all(1 <= s["dynamic_sampling/rounds"] <= 2 for s in steps)


@pytest.mark.slow
@needs_vllm
def test_engine_parity_script_finds_the_engines_alike_in_fp32(tmp_path):
    model = make_vllm_tiny_model(tmp_path / "tiny")
    config = tmp_path / "parity.yaml"
    config.write_text("reward: format\nnum_generations: 4\nmax_completion_length: 12\ntemperature: 0.7\n"
                      "bf16: false\n")
    report_path = tmp_path / "parity.json"
    result = run([sys.executable, "scripts/engine_parity.py", "--config", str(config), "--model", str(model),
                  "--num_prompts", "6", "--num_eval_samples", "6", "--threads", "1",
                  "--output_json", str(report_path)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "engine parity" in result.stdout and "held-out greedy accuracy" in result.stdout
    report = json.loads(report_path.read_text())
    stats = report["stats"]
    for engine in ("ours", "vllm"):  # fp32 engines: each one's log-probs are the trainer's
        assert stats["|engine - trainer| / token"][engine][0] < LOGPROB_TOLERANCE, stats
        assert stats["length (tokens)"][engine][0] > 0
    assert stats["engine log-prob / token"]["ours"][0] < -0.1  # real sampled tokens
    assert report["held_out"]["n"] == 6 and report["held_out"]["identical_completions"] >= 5


# One-line refusals ---------------------------------------------------------------------------------
def test_eager_rollouts_on_vllm_are_refused():
    with pytest.raises(ConfigError, match="EAGER.*--use_vllm false"):
        RLConfig(use_vllm=True, rollout="eager")


def test_server_mode_is_refused():
    with pytest.raises(ConfigError, match="colocate"):
        RLConfig(use_vllm=True, vllm_mode="server")


def test_missing_vllm_is_one_line(monkeypatch):
    from algos.rollout import vllm_engine

    monkeypatch.setattr(vllm_engine, "vllm_available", lambda: False)
    with pytest.raises(vllm_engine.VLLMSetupError, match=r"pip install -e \.\[vllm\]"):
        vllm_engine.check_settings(object(), SamplingParams(), vllm_engine.VLLMSettings())


def test_tempered_and_truncated_sampling_is_refused():
    from algos.rollout.vllm_engine import VLLMSetupError, logprobs_mode_for

    assert logprobs_mode_for(SamplingParams(temperature=1.0, top_p=0.9)) == "raw_logprobs"
    assert logprobs_mode_for(SamplingParams(temperature=0.7)) == "processed_logprobs"
    with pytest.raises(VLLMSetupError, match="temperature 1.0, or top_k 0 and top_p 1.0"):
        logprobs_mode_for(SamplingParams(temperature=0.7, top_p=0.9))


@needs_vllm
@pytest.mark.parametrize("case", ["max_model_len", "architecture", "head_size"])
def test_bad_vllm_settings_are_one_line_from_the_cli(case, tmp_path, tiny_model_path):
    args = ["--model_name_or_path", tiny_model_path]
    needle = "--vllm_max_model_len 64 is smaller than"
    if case == "max_model_len":
        args += ["--vllm_max_model_len", "64", "--max_prompt_length", "64"]
    elif case == "head_size":  # the tiny model's heads are 32 / 4 = 8 wide; vLLM's CPU attention fails on them mid-run
        from algos.rollout.vllm_engine import cpu_attention_head_sizes
        if not cpu_attention_head_sizes():
            pytest.skip("vLLM runs a GPU attention backend here")
        needle = "vLLM's CPU attention cannot run this model's head size 8 (it runs 32, 64,"
    else:
        config = json.loads((Path(tiny_model_path) / "config.json").read_text())
        model = tmp_path / "odd"
        model.mkdir()
        for f in Path(tiny_model_path).iterdir():
            (model / f.name).write_bytes(f.read_bytes())
        config["architectures"] = ["NoSuchModelForCausalLM"]
        (model / "config.json").write_text(json.dumps(config))
        args = ["--model_name_or_path", str(model)]
        needle = "architecture ['NoSuchModelForCausalLM'] is not in vLLM's model registry"
    result = run([sys.executable, "train/grpo.py", *PLAIN_FLAGS, "--use_vllm", "true", *args, "--report_to", "none",
                  "--output_dir", str(tmp_path / "out")], timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [l for l in result.stderr.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "final").exists()


@needs_vllm
@pytest.mark.parametrize("setting, expected", [("auto", True), ("true", True), ("false", False)])
def test_enforce_eager_reaches_vllm(setting, expected, monkeypatch, tmp_path):
    """--vllm_enforce_eager on CPU: auto and true run vLLM eagerly, false lets it compile."""
    import types

    import vllm

    from algos.rollout import vllm_engine

    seen = {}

    class FakeLLM:
        def __init__(self, **kwargs):
            seen.update(kwargs)

    monkeypatch.setattr(vllm, "LLM", FakeLLM)
    monkeypatch.setattr(vllm_engine.torch.cuda, "is_available", lambda: False)
    config = RLConfig(use_vllm=True, vllm_enforce_eager=setting, output_dir=str(tmp_path))
    from algos.trainer import RLTrainer

    trainer = types.SimpleNamespace(config=config, accelerator=types.SimpleNamespace(process_index=0))
    settings = RLTrainer._vllm_settings(trainer)  # the config -> engine settings mapping
    model_config = types.SimpleNamespace(num_hidden_layers=2, num_attention_heads=4, hidden_size=64)
    engine = object.__new__(vllm_engine.VLLMEngine)
    engine.settings = settings
    engine.params = SamplingParams(temperature=config.temperature)
    assert isinstance(engine._start("model", model_config, 64, 0, 1), FakeLLM)
    assert seen["enforce_eager"] is expected
    with pytest.raises(ConfigError, match="vllm_enforce_eager"):
        RLConfig(vllm_enforce_eager="maybe")
