"""Two processes compute the gradient of one: the loss denominators, the whitening and the batch
baselines are the global batch's, even when the processes hold different numbers of tokens
(8 against 48) and of sequences (4 against 2)."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def gradient(model, out: Path, processes: int, *args) -> dict:
    launcher = Path(sys.executable).parent / "accelerate"
    cmd = [str(launcher) if launcher.exists() else "accelerate", "launch", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--num_processes", str(processes)]
    if processes > 1:
        cmd.append("--multi_gpu")
    result = subprocess.run(cmd + [str(ROOT / "tests" / "grad_probe.py"), model, str(out), *args],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = torch.load(out)
    # A DDP wrapper alive after close_process_group keeps the gloo group's threads until the interpreter's
    # finalization, where they can abort the process ("terminate called without an active exception").
    assert saved["live_ddp_after_close"] == 0
    return saved["gradients"]


@pytest.mark.slow
@pytest.mark.parametrize("algorithm, loss_type, scale", [
    ("reinforce_pp", "dapo", "group"),            # token-mean; returns whitened over the batch
    ("grpo", "grpo", "batch"),                    # seq-mean-token-mean; std of the batch's scores
    ("reinforce_pp_baseline", "dr_grpo", "group"),  # B x max_len; group mean, then whitening
])
def test_two_processes_compute_the_gradient_of_one(tiny_model_path, tmp_path, algorithm, loss_type, scale):
    one = gradient(tiny_model_path, tmp_path / "one.pt", 1, algorithm, loss_type, scale)
    two = gradient(tiny_model_path, tmp_path / "two.pt", 2, algorithm, loss_type, scale)
    assert one and one.keys() == two.keys()
    assert max(float(g.abs().max()) for g in one.values()) > 1e-4  # a real gradient
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=1e-6, rtol=1e-5, msg=name)
