"""--device / --dtype: the shared resolver, every job's flags, parts moving to the model's device.

CPU tests cover the device-agnostic code (bf16 on the CPU stands in for a second precision);
``cuda``-marked tests run the same paths on CUDA wherever it exists (conftest skips them elsewhere).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from algos.config import RLConfig
from algos.device import DeviceError, module_device, resolve_device, resolve_device_dtype, resolve_dtype

from script_loader import load_script as _load_script


def test_auto_is_cuda_bf16_where_available_else_cpu_fp32():
    device, dtype = resolve_device_dtype("auto", "auto")
    if torch.cuda.is_available():
        assert device.type == "cuda" and dtype == torch.bfloat16
    else:
        assert device == torch.device("cpu") and dtype == torch.float32
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16 and resolve_dtype("float16", "cpu") == torch.float16
    assert resolve_device("cpu") == torch.device("cpu")


def test_bf16_default_follows_the_hardware(monkeypatch):
    """bf16 mixed precision by default only where it is fast: an AVX2-only CPU emulates it (27x slower)."""
    import algos.device as device
    import algos.sft as sft

    for fast in (True, False):
        monkeypatch.setattr(device, "cpu_has_fast_bf16", lambda fast=fast: fast)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        assert device.bf16_is_fast() is fast and device.bf16_is_fast("cpu") is fast
        assert sft._bf16_supported() is fast  # the thinking model's build
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert device.bf16_is_fast("cuda") is True  # a GPU's answer, whatever the CPU
    monkeypatch.undo()
    assert RLConfig().bf16 is device.bf16_is_fast()  # the trainer's default, decided on this machine


def test_bf16_on_a_cpu_without_fast_bf16_warns_in_one_line(tiny_model_path, tmp_path, capsys, monkeypatch,
                                                          fresh_accelerate_state):
    import algos.trainer as trainer_module
    from algos.trainer import RLTrainer
    from test_trainer import make_config

    monkeypatch.setattr(trainer_module, "cpu_has_fast_bf16", lambda: False)
    RLTrainer(make_config(tiny_model_path, tmp_path, bf16=True))
    warned = [line for line in capsys.readouterr().out.splitlines() if "emulates bfloat16" in line]
    assert warned == ["[repro-rl] warning: --bf16 on a CPU without AVX-512 emulates bfloat16, about 27x slower "
                      "than float32; pass --bf16 false"]


def test_bad_device_or_dtype_is_one_line():
    with pytest.raises(DeviceError, match="not a device name"):
        resolve_device("gpu0")
    with pytest.raises(DeviceError, match="--dtype 'int8'"):
        resolve_dtype("int8", "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="CUDA is not available here; use --device cpu"):
            resolve_device("cuda")


@pytest.mark.parametrize("script, argv", [
    ("train/lynx_probe.py", []), ("train/drllm_router.py", []), ("scripts/evaluate.py", ["--dataset", "arithmetic"]),
    ("scripts/bench_decoder.py", []), ("scripts/bench_drllm.py", []), ("scripts/bench_eager.py", []),
    ("scripts/bench_lynx.py", []), ("scripts/bench_repro.py", []), ("scripts/bench_rl_step.py", []),
    ("scripts/bench_long_sequences.py", []), ("scripts/bench_eager_threshold.py", []),
    ("scripts/lynx_feature_shift.py", ["--probe", "runs/lynx"]),
])
def test_every_job_takes_device_and_dtype(script, argv):
    args = _load_script(script).parse_args(argv + ["--device", "cpu", "--dtype", "bfloat16"])
    assert (args.device, args.dtype) == ("cpu", "bfloat16")
    assert _load_script(script).parse_args(argv).device == "auto"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_a_job_asked_for_cuda_without_it_stops_with_one_line(capsys, tmp_path):
    lynx = _load_script("train/lynx_probe.py")
    with pytest.raises(SystemExit) as exit_info:
        lynx.main(["--device", "cuda", "--dataset", "arithmetic", "--num_problems", "8", "--num_eval_problems", "0",
                   "--output_dir", str(tmp_path / "probe"), "--progress", "false"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --device cuda: CUDA is not available here; use --device cpu (or auto)"]
    assert not (tmp_path / "probe").exists()


def test_probe_scores_features_of_any_dtype_and_device():
    from probes.probe import ExitProbe

    probe = ExitProbe(8, (4,)).eval()
    x = torch.randn(3, 8)
    want = probe.predict_proba(x)
    torch.testing.assert_close(probe.predict_proba(x.to(torch.bfloat16)), want, atol=2e-2, rtol=0)
    assert module_device(probe) == torch.device("cpu") and module_device(torch.nn.ReLU()) == torch.device("cpu")


def _bundle_parts(model):
    from algos.fingerprint import base_identity
    from probes.conformal import ConformalCalibration
    from probes.cues import CueConfig
    from probes.export import LynxProbe
    from probes.probe import ExitProbe

    probe = ExitProbe(2 * model.config.hidden_size, (8,))
    with torch.no_grad():
        probe.mlp[-1].bias.fill_(20.0)  # exits at every cue
    return LynxProbe(probe=probe.eval(), calibration=ConformalCalibration([0.5] * 20, [0.1] * 20), layers=(1, 2),
                     cue_config=CueConfig(("e",), word_boundary=False, region_end=()), exit_string=" Final: \\boxed{",
                     base_model=base_identity(model), answer_max_tokens=5)


def _export_parts(tiny_model_path, out: Path):
    """A probe and a router saved from the float32 model."""
    from algos.models import load_causal_lm
    from probes.export import save_probe
    from routers.export import save_router
    from routers.router import PathRouter

    model = load_causal_lm(tiny_model_path)
    save_probe(out / "probe", _bundle_parts(model))
    torch.manual_seed(0)
    save_router(PathRouter(model.config.num_hidden_layers, model.config.hidden_size), out / "router", model)
    return str(out / "probe"), str(out / "router")


def _decode_everything(decoder):
    prompts = ["What is 3 + 4?", "Compute 12 * 7."]
    outs = {
        "lynx": decoder.generate(prompts, early_exit=True, confidence=0.9, max_new_tokens=12, do_sample=True,
                                 temperature=0.9, seed=0),
        "routed": decoder.generate(prompts, routing=True, max_new_tokens=8),
        "all": decoder.generate(prompts, early_exit=True, confidence=0.9, routing=True, branching=True,
                                do_sample=True, temperature=1.0, max_new_tokens=8, seed=0, branch_threshold=0.5,
                                dynamic_threshold=True),
    }
    assert any(s.exited for s in outs["lynx"].sequences + outs["all"].sequences)  # the probe was scored
    assert all(s.num_tokens > 0 for out in outs.values() for s in out.sequences)
    return outs


def test_decoder_in_bf16_loads_float32_parts_and_decodes(tiny_model_path, tmp_path):
    """--dtype bfloat16: the router saved from the float32 weights is accepted (fingerprints match once
    rounded to bf16), the probe scores bf16 hidden states, every part decodes."""
    from deploy.decoder import EfficientDecoder

    probe_dir, router_dir = _export_parts(tiny_model_path, tmp_path)
    decoder = EfficientDecoder.from_pretrained(tiny_model_path, probe=probe_dir, router=router_dir,
                                               device="cpu", dtype="bfloat16")
    assert next(decoder.model.parameters()).dtype == torch.bfloat16
    _decode_everything(decoder)


def test_router_for_other_weights_is_still_refused_in_bf16(tiny_model_path, tmp_path):
    from algos.models import load_causal_lm
    from routers.export import load_router, save_router
    from routers.router import PathRouter
    from tests.conftest import make_tiny_model

    other = load_causal_lm(str(make_tiny_model(tmp_path / "other", seed=1)))
    save_router(PathRouter(other.config.num_hidden_layers, other.config.hidden_size), tmp_path / "router", other)
    model = load_causal_lm(tiny_model_path, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="fingerprint"):
        load_router(tmp_path / "router", model)


# ---------------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
def test_decoder_on_cuda_moves_probe_and_router_and_decodes(tiny_model_path, tmp_path):
    from deploy.decoder import EfficientDecoder

    probe_dir, router_dir = _export_parts(tiny_model_path, tmp_path)
    decoder = EfficientDecoder.from_pretrained(tiny_model_path, probe=probe_dir, router=router_dir, device="cuda")
    assert module_device(decoder.probe.probe).type == "cuda" and module_device(decoder.router).type == "cuda"
    assert next(decoder.model.parameters()).dtype == torch.bfloat16  # auto on CUDA
    _decode_everything(decoder)


@pytest.mark.cuda
def test_lynx_collection_on_cuda(tiny_model_path, tmp_path):
    from algos.models import load_causal_lm, load_tokenizer
    from probes.collect import CollectConfig, collect_events
    from probes.cues import CueConfig

    model = load_causal_lm(tiny_model_path, dtype=torch.bfloat16).cuda().eval()
    tok = load_tokenizer(tiny_model_path)
    records = [{"question": "What is 2 + 3?", "answer": "5"}, {"question": "What is 4 + 4?", "answer": "8"}]
    cfg = CollectConfig(layers=(1, 2), cue_config=CueConfig(("e",), word_boundary=False, region_end=()),
                        max_new_tokens=12, answer_max_tokens=4, batch_size=2)
    shards = collect_events(model, tok, records, tmp_path / "events", cfg, progress=False)
    events = shards.load()
    assert len(events) > 0 and events.features.dtype == torch.float32 and events.features.device.type == "cpu"


@pytest.mark.cuda
def test_chunked_logprobs_on_cuda_in_bf16_match_full_logits():
    from algos.logprobs import logprobs_from_hidden, logprobs_from_logits

    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(2, 300, 64, device="cuda", generator=g)
    head = torch.nn.Linear(64, 1000, bias=False, device="cuda")
    y = torch.randint(0, 1000, (2, 300), device="cuda", generator=g)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        want = logprobs_from_logits(head(h).float(), y)
        got = logprobs_from_hidden(h, head, y, chunk_size=128)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.cuda
def test_running_quantile_on_cuda():
    from algos.rollout.quantile import RunningQuantile

    values = torch.rand(10_000, device="cuda") * 3
    sketch = RunningQuantile(1, 0.0, 3.0, device="cuda")
    sketch.add(torch.zeros(10_000, dtype=torch.long, device="cuda"), values)
    assert abs(float(sketch.quantile(0.99)[0]) - float(torch.quantile(values, 0.99))) <= sketch.width + 1e-6


@pytest.mark.cuda
def test_drllm_router_job_on_cuda(tiny_model_path, tmp_path):
    job = _load_script("train/drllm_router.py")
    summary = job.run(job.parse_args(["--model_name_or_path", tiny_model_path, "--num_search_examples", "4",
                                      "--num_eval_samples", "2", "--simulations", "2", "--epochs", "1",
                                      "--max_new_tokens", "4", "--require_boxed", "false", "--device", "cuda",
                                      "--output_dir", str(tmp_path / "drllm"), "--progress", "false"]))
    assert Path(summary["router_dir"]).is_dir()


@pytest.mark.cuda
@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_trainer_steps_on_cuda_in_bf16(tiny_model_path, tmp_path, algorithm):
    """The RL trainer on CUDA with bf16 mixed precision (the headline's settings): finite losses, a
    gradient, weights that change, and a float32 checkpoint (master weights stay float32)."""
    from algos.trainer import RLTrainer
    from test_trainer import make_config, read_metrics, weights

    trainer = RLTrainer(make_config(tiny_model_path, tmp_path, algorithm=algorithm, bf16=True))
    assert trainer.accelerator.device.type == "cuda"
    trainer.train()
    steps = [m for m in read_metrics(tmp_path) if "loss/policy" in m]
    assert [m["step"] for m in steps] == [1, 2]
    assert all(torch.isfinite(torch.tensor(m["loss/policy"])) and m["grad_norm"] > 0 for m in steps)
    before, after = weights(tiny_model_path), weights(tmp_path / "final")
    assert all(t.dtype == torch.float32 for t in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.cuda
def test_sft_builds_on_cuda_in_bf16(tiny_model_path, tmp_path):
    """The thinking-model build (TRL SFTTrainer) on CUDA in bf16 trains and saves float32 weights."""
    from algos.fingerprint import weight_fingerprint
    from algos.models import load_causal_lm
    from algos.sft import SFTJobConfig, run_sft

    config = SFTJobConfig(model_name_or_path=tiny_model_path, output_dir=str(tmp_path / "sft"), num_train_samples=8,
                          per_device_train_batch_size=4, max_length=256, bf16=True, learning_rate=1e-2,
                          progress=False)
    out = run_sft(config)
    tuned = load_causal_lm(out)
    assert next(tuned.parameters()).dtype == torch.float32
    assert weight_fingerprint(tuned) != weight_fingerprint(load_causal_lm(tiny_model_path))
