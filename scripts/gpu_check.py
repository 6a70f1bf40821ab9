"""The prepared GPU check (run it through scripts/gpu_check.sh): one table of what runs on CUDA and how fast.

Models are randomly initialised from real configs in configs/models/ (SmolLM2-135M- and Qwen2.5-1.5B-shaped;
no weights travel), with the SmolLM2 tokenizer shipped there. Random models rarely sample EOS, so
generation runs to its fixed length. Rows:

  matmul peak   bf16 TFLOP/s of an n x n x n product (mean of 10 after 3 warm-ups): the MFU denominator
  cuda tests    pytest -m cuda (the tests that run wherever CUDA exists)
  grpo <model>  GRPO steps in bf16 (--bf16: fp32 master weights, bf16 autocast), our sampler: tokens/s of
                the step (generated + trained tokens) and MFU = (2 N per generated token + 6 N per trained
                token) / step time / peak, N = weights of the linear layers (lm_head included)
  decoders      EfficientDecoder on CUDA: plain, LYNX (random probe), EAGER, Dr.LLM (random router): tokens/s
  long seqs     scripts/bench_long_sequences.py at 1k/4k/8k: peak GB full vs chunked log-probs
  eager theta   scripts/bench_eager_threshold.py: per-step cost of the dynamic threshold vs entropies seen
  zero2/zero3   accelerate launch with configs/accelerate/zero{2,3}.yaml, GRPO (1 process), if DeepSpeed imports

``--cpu-dry-run`` (automatic without CUDA) runs every row at toy sizes on the CPU (the cuda tests are then
skipped by their marker): it checks that the script works, not the figures.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

MODELS = {"smollm2-135m": "configs/models/smollm2-135m.json", "qwen2.5-1.5b": "configs/models/qwen2.5-1.5b.json"}
REWARD = f"{ROOT / 'tests' / 'rewards_for_tests.py'}:length_reward"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-dry-run", dest="dry_run", action="store_true",
                   help="toy sizes on the CPU (automatic without CUDA): checks the script, not the figures")
    p.add_argument("--only", default="", help="comma list of rows to run (peak,tests,grpo,decoders,long,theta,zero)")
    p.add_argument("--workdir", default=None, help="where the random models and runs go (default: a temp dir)")
    args = p.parse_args(argv)
    args.dry_run = args.dry_run or not torch.cuda.is_available()
    return args


def tokenizer_dir(work: Path) -> Path:
    out = work / "tokenizer"
    if not out.exists():
        src = ROOT / "configs" / "models" / "tokenizer"
        out.mkdir(parents=True)
        for f in src.iterdir():
            if f.suffix == ".gz":
                (out / f.stem).write_bytes(gzip.decompress(f.read_bytes()))
            else:
                shutil.copy(f, out / f.name)
    return out


def random_model(name: str, work: Path, dry_run: bool) -> str:
    """A randomly initialised model of the named config (shrunk to 2 layers, width 64 in a dry run)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = work / name
    if (out / "config.json").exists():
        return str(out)
    data = json.loads((ROOT / MODELS[name]).read_text())
    tok = AutoTokenizer.from_pretrained(tokenizer_dir(work))
    data.update(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if dry_run:
        data.update(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, vocab_size=max(len(tok), 1024))
    config = AutoConfig.for_model(**{k: v for k, v in data.items() if k != "architectures"})
    config.architectures = data["architectures"]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def matmul_peak(dry_run: bool) -> float:
    """Measured bf16 FLOP/s: n^3 product, mean of 10 after 3 warm-ups."""
    device = "cpu" if dry_run else "cuda"
    n = 512 if dry_run else 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    sync()
    return 2 * n**3 * 10 / (time.perf_counter() - start)


def run(cmd: list[str], timeout: int, env: dict | None = None) -> tuple[int, str]:
    try:
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false", **(env or {})})
        return r.returncode, r.stdout + r.stderr
    except subprocess.TimeoutExpired as exc:
        return 124, f"timed out after {timeout} s: {(exc.stdout or '')[-300:]}"


def last_error(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if re.search(r"(Error|error|FAILED|Exception)\b", ln)]
    return (lines[-1] if lines else (text.strip().splitlines() or ["no output"])[-1])[:160]


def row_tests(dry_run: bool) -> tuple[str, str]:
    code, out = run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "tests/"], 600)
    summary = next((ln for ln in reversed(out.splitlines()) if re.search(r"\d+ (passed|failed|skipped|deselected)", ln)), "")
    return ("ok" if code == 0 else "FAIL"), summary.strip("= ") or last_error(out)


def row_grpo(model_path: str, dry_run: bool, peak: float) -> tuple[str, str]:
    """GRPO steps in bf16 through the trainer; tokens/s and MFU of the steps after the first."""
    from algos.config import RLConfig
    from algos.trainer import RLTrainer

    length = 16 if dry_run else 256
    prompts, group = (1, 2) if dry_run else (8, 8)
    steps = 2 if dry_run else 4
    out = tempfile.mkdtemp(prefix="gpu_check_grpo.")
    config = RLConfig(algorithm="grpo", model_name_or_path=model_path, output_dir=out, dataset="arithmetic",
                      num_generations=group, per_device_train_batch_size=prompts * group, max_completion_length=length,
                      max_steps=steps, reward=REWARD, report_to="none", log_completions_steps=0, num_eval_samples=0,
                      bf16=True, learning_rate=1e-6, use_vllm=False, gradient_accumulation_steps=1,
                      temperature=1.0, eval_on_start=False, dynamic_sampling=False)
    trainer = RLTrainer(config)
    n_linear = sum(m.weight.numel() for m in trainer.policy.modules() if isinstance(m, torch.nn.Linear))
    rates, mfus = [], []
    for step in range(steps):
        metrics = trainer.training_step()
        trainer.step += 1
        gen_tokens = metrics["throughput/generation_tokens_per_second"] * metrics["time/generation_seconds"]
        train_tokens = metrics["throughput/training_tokens_per_second"] * metrics["time/update_seconds"]
        seconds = metrics["time/step_seconds"]
        if step:
            rates.append((gen_tokens + train_tokens) / seconds)
            mfus.append((2 * n_linear * gen_tokens + 6 * n_linear * train_tokens) / seconds / peak)
    shutil.rmtree(out, ignore_errors=True)
    rate, mfu = sum(rates) / len(rates), sum(mfus) / len(mfus)
    return "ok", (f"{rate:,.0f} tok/s, MFU {100 * mfu:.1f}% ({prompts}x{group} rows x {length} tokens, "
                  f"{steps - 1} timed steps)")


def row_decoders(model_path: str, dry_run: bool) -> tuple[str, str]:
    """Each decoder part on the device, fixed-length generation: tokens/s."""
    from algos.models import model_identity
    from deploy.decoder import EfficientDecoder
    from probes.conformal import ConformalCalibration
    from probes.cues import CueConfig
    from probes.early_exit import default_layers
    from probes.export import LynxProbe
    from probes.probe import ExitProbe
    from routers.router import PathRouter

    device = "cpu" if dry_run else "cuda"
    decoder = EfficientDecoder.from_pretrained(model_path, device=device)
    model = decoder.model
    layers = default_layers(model.config.num_hidden_layers)
    torch.manual_seed(0)
    decoder.probe = LynxProbe(probe=ExitProbe(len(layers) * model.config.hidden_size).to(device).eval(),
                              calibration=ConformalCalibration([0.5] * 20, [0.5] * 20), layers=layers,
                              cue_config=CueConfig(("\n",), word_boundary=False, region_end=()),
                              exit_string="\nFinal Answer: \\boxed{", base_model=model_identity(model))
    decoder.router = PathRouter(model.config.num_hidden_layers, model.config.hidden_size).to(device).eval()
    prompts = ["What is 12 + 30?"] * (2 if dry_run else 16)
    n = 16 if dry_run else 256
    parts = {"plain": {}, "lynx": {"early_exit": True, "confidence": 0.9}, "eager": {"branching": True},
             "drllm": {"routing": True}}
    figures = []
    for name, kw in parts.items():
        sampling = dict(do_sample=True, temperature=1.0, seed=0) if name == "eager" else {}
        decoder.generate(prompts[:1], max_new_tokens=4, **kw, **sampling)  # warm-up
        out = decoder.generate(prompts, max_new_tokens=n, **kw, **sampling)
        figures.append(f"{name} {out.total_tokens / out.seconds:,.0f}")
    return "ok", "tok/s: " + ", ".join(figures) + f" ({len(prompts)} prompts x {n} tokens)"


def row_long(model_path: str, dry_run: bool) -> tuple[str, str]:
    lengths = "64,128" if dry_run else "1024,4096,8192"
    code, out = run([sys.executable, "scripts/bench_long_sequences.py", "--model", model_path, "--lengths", lengths,
                     "--repeats", "1" if dry_run else "2"], 900)
    rows = [ln.split() for ln in out.splitlines() if re.match(r"^\s*\d+\s+[\d.]+\s+[\d.]+\s+[\d.]+", ln)]
    if code or not rows:
        return "FAIL", last_error(out)
    return "ok", "; ".join(f"L={r[0]}: {r[1]} -> {r[2]} GB ({r[3]}x), {r[4]} -> {r[5]} s" for r in rows)


def row_theta(dry_run: bool) -> tuple[str, str]:
    code, out = run([sys.executable, "scripts/bench_eager_threshold.py", "--seen", "1000,100000,300000",
                     "--steps", "5" if dry_run else "20", "--device", "cpu" if dry_run else "cuda"], 600)
    line = next((ln for ln in out.splitlines() if ln.startswith("histogram cost")), None)
    table = [ln.split() for ln in out.splitlines() if re.match(r"^\s*\d+\s+[\d.]+\s+[\d.]+", ln)]
    if code or line is None:
        return "FAIL", last_error(out)
    return "ok", "; ".join(f"n={r[0]}: list {r[1]} us, histogram {r[2]} us" for r in table)


def row_zero(stage: str, model_path: str, dry_run: bool) -> tuple[str, str]:
    try:
        import deepspeed  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means: not installed here
        return "skip", f"DeepSpeed does not import ({type(exc).__name__}); carry .whl (scripts/gpu_wheels.sh)"
    length = 8 if dry_run else 128
    out = tempfile.mkdtemp(prefix=f"gpu_check_{stage}.")
    launcher = shutil.which("accelerate") or str(Path(sys.executable).parent / "accelerate")
    env = {"DS_ACCELERATOR": "cpu"} if dry_run else {}
    procs = "2" if dry_run else "1"
    start = time.perf_counter()
    code, text = run([launcher, "launch", "--config_file", f"configs/accelerate/{stage}.yaml", "--num_processes", procs,
                      "--mixed_precision", "no" if dry_run else "bf16", "train/grpo.py", "--model_name_or_path",
                      model_path, "--max_steps", "2", "--num_generations", "4", "--per_device_train_batch_size", "8",
                      "--max_completion_length", str(length), "--num_eval_samples", "0", "--report_to", "none",
                      "--reward", REWARD, "--output_dir", out, "--dataset", "arithmetic", "--use_vllm", "false",
                      "--gradient_accumulation_steps", "1", "--eval_on_start", "false",
                      "--bf16", "false" if dry_run else "true"], 600, env)
    seconds = time.perf_counter() - start
    used_deepspeed = any(Path(out).glob("final/trainer_state/zero_to_fp32.py"))  # written by DeepSpeed's save
    shutil.rmtree(out, ignore_errors=True)
    if code:
        return "FAIL", last_error(text)
    if not used_deepspeed:
        return "FAIL", ("ran as plain data parallelism, not DeepSpeed: the trainer's Accelerator(cpu=True) drops it "
                        "(wire algos/deepspeed_setup.py into algos/trainer.py)")
    return "ok", f"GRPO 2 steps on {procs} process(es) in {seconds:.0f} s (launch included)"


def main(argv=None) -> int:
    args = parse_args(argv)
    only = set(filter(None, args.only.split(",")))
    want = (lambda name: not only or name in only)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="gpu_check."))
    work.mkdir(parents=True, exist_ok=True)
    device = "cpu (dry run: toy sizes, figures are not GPU figures)" if args.dry_run else torch.cuda.get_device_name(0)
    print(f"[gpu_check] {device} | torch {torch.__version__} | work dir {work}", flush=True)
    rows: list[tuple[str, str, str]] = []

    def record(name, fn, *a):
        start = time.perf_counter()
        try:
            status, detail = fn(*a)
        except Exception as exc:  # noqa: BLE001 - a row that breaks is reported, the next rows still run
            status, detail = "FAIL", f"{type(exc).__name__}: {str(exc).splitlines()[0][:150] if str(exc) else ''}"
        rows.append((name, status, f"{detail} [{time.perf_counter() - start:.0f} s]"))
        print(f"[gpu_check] {name}: {status} {detail}", flush=True)

    peak = matmul_peak(args.dry_run)
    rows.append(("matmul peak", "ok", f"bf16 {peak / 1e12:.3g} TFLOP/s"))
    paths = {name: random_model(name, work, args.dry_run) for name in MODELS}
    if want("tests"):
        record("cuda tests", row_tests, args.dry_run)
    if want("grpo"):
        for name, path in paths.items():
            record(f"grpo {name}", row_grpo, path, args.dry_run, peak)
    if want("decoders"):
        record("decoders smollm2-135m", row_decoders, paths["smollm2-135m"], args.dry_run)
    if want("long"):
        record("long seqs smollm2-135m", row_long, paths["smollm2-135m"], args.dry_run)
    if want("theta"):
        record("eager theta", row_theta, args.dry_run)
    if want("zero"):
        for stage in ("zero2", "zero3"):
            record(stage, row_zero, stage, paths["smollm2-135m"], args.dry_run)
    width = max(len(r[0]) for r in rows)
    print("\n| check | result | figures |\n|---|---|---|")
    for name, status, detail in rows:
        print(f"| {name:<{width}} | {status} | {detail} |")
    return 1 if any(status == "FAIL" for _, status, _ in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
