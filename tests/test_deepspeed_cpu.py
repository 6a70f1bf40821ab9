"""DeepSpeed ZeRO-2/3 really run: 2 processes on the CPU (DS_ACCELERATOR=cpu, gloo), through
`accelerate launch --config_file configs/accelerate/zero{2,3}.yaml`, as a user would launch them.

Needs `pip install deepspeed` (scripts/setup.sh installs it) and the trainer's use of
``algos.deepspeed_setup`` (without it accelerate silently replaces DeepSpeed by plain data parallelism
on a CPU, which these tests catch: only DeepSpeed's save writes zero_to_fp32.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from plain_settings import PLAIN_FLAGS

ROOT = Path(__file__).resolve().parents[1]
REWARD = f"{ROOT / 'tests' / 'rewards_for_tests.py'}:length_reward"


def _launch(stage: str, algorithm: str, model_path: str, out: Path, extra: list[str], reward: str = REWARD,
            mixed_precision: str = "no", probe: bool = False) -> dict:
    """``accelerate launch`` a 2-step run on 2 CPU processes; its trainer_state.json. With ``probe`` the
    entry point runs under tests/engine_probe.py, which counts the DeepSpeed engines left alive."""
    launcher = Path(sys.executable).parent / "accelerate"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
           "REPRO_RL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    script = ["tests/engine_probe.py", algorithm] if probe else [f"train/{algorithm}.py"]
    result = subprocess.run(
        [str(launcher) if launcher.exists() else "accelerate", "launch", "--config_file",
         f"configs/accelerate/{stage}.yaml", "--num_processes", "2", "--mixed_precision", mixed_precision,
         *script, *PLAIN_FLAGS, "--model_name_or_path", model_path, "--reward", reward, "--max_steps", "2",
         "--num_generations", "2", "--per_device_train_batch_size", "2", "--max_completion_length", "8",
         "--num_eval_samples", "0", "--report_to", "none", "--learning_rate", "1e-3", "--output_dir", str(out),
         *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "final" / "trainer_state" / "zero_to_fp32.py").exists(), "ran without DeepSpeed"
    state = json.loads((out / "final" / "trainer_state.json").read_text())
    assert state["num_processes"] == 2
    return state


@pytest.mark.slow
@pytest.mark.parametrize("stage, algorithm, extra", [
    ("zero2", "grpo", []), ("zero2", "ppo", []), ("zero2", "grpo", ["--use_peft", "true"]),
    ("zero3", "grpo", ["--use_peft", "true"]),
    # PPO under ZeRO-3: the KL reference in its own DeepSpeed engine, the separate critic's backbone
    # loaded (a deep copy had zero-element parameters), the chunked output layer (3 tokens a chunk)
    ("zero3", "ppo", ["--logprobs_chunk_size", "3"]), ("zero3", "ppo", ["--critic_backbone", "shared"]),
])
def test_zero_runs_on_two_cpu_processes(tiny_model_path, tmp_path, stage, algorithm, extra):
    """The same weights in both processes, and no engine left alive after the entry point left the
    process group (ZeRO-3 models stay reachable from DeepSpeed's module-level stack and cache unless
    algos.deepspeed_setup.release_engines empties them)."""
    pytest.importorskip("deepspeed")
    out = tmp_path / "run"
    a, b = _launch(stage, algorithm, tiny_model_path, out, extra, probe=True)["rank_weight_checksums"]
    assert a == b, "the two processes ended with different weights"
    live = [json.loads((out / f"live_engines_rank{rank}.json").read_text())["live_engines"] for rank in (0, 1)]
    assert live == [0, 0]


@pytest.mark.slow
def test_zero3_ppo_under_bf16(tiny_model_path, tmp_path):
    """PPO under ZeRO-3 with bf16 (what configs/accelerate/zero3.yaml sets): the policy is built under
    zero.Init in bf16 shards and the value head must join them in that dtype; an fp32 head stopped
    DeepSpeed's flattening of the parameters with a bare AssertionError."""
    pytest.importorskip("deepspeed")
    a, b = _launch("zero3", "ppo", tiny_model_path, tmp_path / "run", ["--bf16", "true"],
                   mixed_precision="bf16")["rank_weight_checksums"]
    assert a == b, "the two processes ended with different weights"


@pytest.mark.slow
def test_zero3_generation_gathers_once_with_the_same_result(tiny_model_path, tmp_path):
    """GRPO under ZeRO-3 with the parameters gathered once per rollout (the default) and layer by
    layer at every decoding step (--ds3_gather_for_generation false): the same samples, so the same
    weights after 2 steps; chunked log-probs (3 tokens a chunk) in both."""
    pytest.importorskip("deepspeed")
    sums = [_launch("zero3", "grpo", tiny_model_path, tmp_path / flag, ["--logprobs_chunk_size", "3",
                                                                        "--ds3_gather_for_generation", flag])
            ["rank_weight_checksums"] for flag in ("true", "false")]
    assert sums[0][0] == sums[0][1] and sums[1][0] == sums[1][1]
    assert sums[0][0] == pytest.approx(sums[1][0], rel=1e-6)


@pytest.mark.slow
def test_zero3_with_a_colocated_vllm_engine(tmp_path):
    """GRPO under ZeRO-3 with a vLLM engine in each process: the sync gathers each block's sharded
    parameters; after step 1's update the engine's log-probs match the trainer's again at step 2."""
    pytest.importorskip("deepspeed")
    pytest.importorskip("vllm")
    from test_vllm import make_vllm_tiny_model

    model = make_vllm_tiny_model(tmp_path / "tiny")
    out = tmp_path / "run"
    a, b = _launch("zero3", "grpo", str(model), out, ["--use_vllm", "true", "--num_generations", "4",
                                                      "--per_device_train_batch_size", "8",
                                                      "--learning_rate", "1e-2"])["rank_weight_checksums"]
    assert a == b, "the two processes ended with different weights"
    steps = [json.loads(line) for line in open(out / "metrics.jsonl") if "vllm/abs_logprob_diff" in line]
    assert [m["step"] for m in steps] == [1, 2]
    assert steps[0]["grad_norm"] > 0  # step 1 changed the policy that step 2 samples from
    assert max(m["vllm/abs_logprob_diff"] for m in steps) < 2e-4  # fp32 engine and trainer
