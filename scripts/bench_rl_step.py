"""One GRPO step, ours against TRL's GRPOTrainer, same settings, alternating A/B in one process.

Both trainers get the same model weights (two copies of one checkpoint), the same prompts in the
same order (arithmetic task, chat template), the same reward (``rewards.outcome.accuracy``), group
size G, completion length, temperature 1, AdamW (torch's fused kernel: TRL's default and ours) with
the same learning rate and a constant schedule,
beta = 0, loss_type dapo, one rollout batch of ``num_prompts x G`` completions per optimizer step
(one micro-batch, no reuse), HF models on CPU for generation and training, fp32 or bf16 autocast.

How a step is timed: TRL runs ``trainer.train(max_steps=steps)`` and a callback does the A/B
alternation: at each ``on_step_begin`` it closes the previous TRL step, runs and times one of our
steps, then opens the next TRL step. A TRL step is therefore everything Trainer does between two
``on_step_begin`` calls (generation, rewards, loss, backward, clipping, optimizer, logging,
fetching the next batch); the last one ends at ``on_train_end``. Our step is ``training_step``
plus the metrics log write (what ``RLTrainer.train`` does per step). TRL's generation and
scoring phases are timed by wrapping the instance's ``_generate`` and
``_generate_and_score_completions`` (no TRL code is changed). Step 1 is a warm-up and is left out
of the medians (``--warmup``).

Printed per step and as medians: generation tokens/s (completion tokens / generation seconds),
training tokens/s (prompt + completion tokens / seconds after scoring), step seconds, total
tokens/s ((completion + prompt + completion tokens) / step seconds), peak RSS of the process during
the step (both trainers live in it) and how much the step added over its start ("+step"), and
model-FLOPs utilisation: (2 N (prompt + completion) for sampling + 6 N (prompt + completion) for the
update, N = weights of all linear layers, lm_head included; attention FLOPs ignored) / step seconds
/ the matmul peak measured here for the dtype in use. Ratios are ours / TRL.

It also checks the math: one of our rollout batches goes through our ``RLTrainer.forward`` and
TRL's ``_get_per_token_logps_and_entropies`` on the same model; the max |difference| of the
per-token log-probs over response tokens must be < 1e-4 (fp32; under --bf16 it is reported only).

With ``--use_vllm`` a third trainer joins the alternation: ours sampling with the colocated vLLM
engine (``algos/rollout/vllm_engine.py``; its step includes the weight sync). vLLM allows one engine per
process, so TRL with ``use_vllm=True, vllm_mode="colocate"`` then runs after the A/B run in a child
process of its own (same settings, its own medians); if TRL's vLLM path fails, the error line is
printed. Ratios are printed for every pair that matters: ours+vLLM / ours, / TRL, / TRL+vLLM.

    python scripts/bench_rl_step.py --model smollm2-135m-instruct --steps 6 --threads 2
    python scripts/bench_rl_step.py --model tiny --steps 6 --threads 2
    python scripts/bench_rl_step.py --bf16 --use_vllm --steps 6 --threads 2
    python scripts/bench_rl_step.py --bf16 --use_vllm --dataset gsm8k --max_completion_length 512 --steps 4
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402
import torch  # noqa: E402

LOGPROB_TOLERANCE = 1e-4


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct",
                    help="'tiny' (random 2-layer Llama, tests/conftest.py), the default model, or a path")
    ap.add_argument("--dataset", default="arithmetic", help="prompts: arithmetic (short answers) or gsm8k (long)")
    ap.add_argument("--num_generations", type=int, default=8, help="group size G")
    ap.add_argument("--num_prompts", type=int, default=2, help="prompts per step (batch = num_prompts x G)")
    ap.add_argument("--max_completion_length", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--learning_rate", type=float, default=1e-6)
    ap.add_argument("--steps", type=int, default=5, help="steps per trainer")
    ap.add_argument("--warmup", type=int, default=1, help="first steps left out of the medians")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast for both trainers")
    ap.add_argument("--gradient_checkpointing", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: all cores)")
    ap.add_argument("--hf_generate", action="store_true",
                    help="ours samples with model.generate too (default: our loop that drops finished rows)")
    ap.add_argument("--skip_trl", action="store_true", help="time our trainer alone (memory runs)")
    ap.add_argument("--use_vllm", action="store_true",
                    help="also time ours with the colocated vLLM engine, and TRL with vLLM in a child process")
    ap.add_argument("--vllm_enforce_eager", default="auto", choices=("auto", "true", "false"),
                    help="ours with vLLM: eager (true) or compiled (false; about a minute of compiling on CPU, "
                         "not counted in the steps); auto: eager on CPU")
    ap.add_argument("--trl_vllm_child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0)
    from algos.device import add_device_arguments

    add_device_arguments(ap)  # --dtype auto keeps --bf16 (bf16 always on CUDA); the TRL arm follows --device
    return ap.parse_args(argv)


# Machine measurements ---------------------------------------------------------------------------
def matmul_peak(dtype: torch.dtype, n: int = 1024, seconds: float = 0.4, repeats: int = 5) -> float:
    """Measured FLOP/s of an n x n @ n x n matmul (2 n^3 FLOPs) at the current thread count: the
    best of ``repeats`` windows of ``seconds`` (the machine is shared; the best is the peak)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(repeats):
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            a @ b
            count += 1
        best = max(best, 2 * n ** 3 * count / (time.perf_counter() - start))
    return best


class RssPeak:
    """Highest resident set size seen by a 5 ms sampling thread since the last ``reset``."""

    def __init__(self):
        self.process = psutil.Process()
        self.peak = self.start = self.process.memory_info().rss
        self._stop = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def reset(self):
        self.peak = self.start = self.process.memory_info().rss

    def close(self):
        self._stop.set()


def linear_weights(model) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


# The two trainers -------------------------------------------------------------------------------
def build_ours(args, model_path: str, out_dir: str, use_vllm: bool = False):
    from algos.config import RLConfig
    from algos.trainer import RLTrainer

    config = RLConfig(use_vllm=use_vllm, vllm_enforce_eager=args.vllm_enforce_eager,
        algorithm="grpo", model_name_or_path=model_path, output_dir=out_dir, seed=args.seed, dataset=args.dataset,
        num_generations=args.num_generations, per_device_train_batch_size=args.num_prompts * args.num_generations,
        max_completion_length=args.max_completion_length, temperature=args.temperature,
        learning_rate=args.learning_rate, max_steps=args.steps, reward="accuracy", report_to="none",
        log_completions_steps=0, num_eval_samples=0, eval_on_start=False, bf16=args.bf16, gradient_accumulation_steps=1,
        gradient_checkpointing=args.gradient_checkpointing, drop_finished_sequences=not args.hf_generate,
        dynamic_sampling=False)  # one generation round per step, as TRL's
    return RLTrainer(config)


def build_trl(args, model_path: str, out_dir: str, prompts: list[str], answers: list[str], callback,
              use_vllm: bool = False):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from algos.models import load_causal_lm, load_tokenizer
    from rewards.outcome import accuracy

    config = GRPOConfig(
        output_dir=out_dir, use_cpu=args.use_cpu, bf16=args.bf16, fp16=False, seed=args.seed,
        per_device_train_batch_size=args.num_prompts * args.num_generations, gradient_accumulation_steps=1,
        steps_per_generation=1, num_iterations=1, num_generations=args.num_generations,
        max_completion_length=args.max_completion_length, temperature=args.temperature, top_p=1.0, top_k=0,
        learning_rate=args.learning_rate, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, beta=0.0, epsilon=0.2, loss_type="dapo", scale_rewards="group",
        max_steps=args.steps, logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True,
        shuffle_dataset=False, log_completions=False, dataloader_num_workers=0,
        gradient_checkpointing=args.gradient_checkpointing,
        **(dict(use_vllm=True, vllm_mode="colocate", vllm_max_model_length=1024 + args.max_completion_length)
           if use_vllm else {}))
    model = load_causal_lm(model_path, dtype=torch.float32)
    dataset = Dataset.from_dict({"prompt": prompts, "answer": answers})
    return GRPOTrainer(model=model, reward_funcs=[accuracy], args=config, train_dataset=dataset,
                       processing_class=load_tokenizer(model_path), callbacks=[callback])


def wrap_timed(obj, name: str, record: dict) -> None:
    """Time every call of ``obj.name`` into ``record[name]`` and keep its last output."""
    original = getattr(obj, name)

    def timed(*a, **kw):
        start = time.perf_counter()
        out = original(*a, **kw)
        record[name] = record.get(name, 0.0) + time.perf_counter() - start
        record[name + ":out"] = out
        return out

    setattr(obj, name, timed)


# One step each ----------------------------------------------------------------------------------
def row(step_s, gen_s, score_s, gen_tokens, train_tokens, rss, flops_per_token, peak) -> dict:
    return {"step_s": step_s, "gen_tok_s": gen_tokens / gen_s, "train_tok_s": train_tokens / max(step_s - score_s, 1e-9),
            "tok_s": (gen_tokens + train_tokens) / step_s, "rss_gb": rss.peak / 2**30,
            "rss_step_gb": (rss.peak - rss.start) / 2**30,
            "mfu": flops_per_token * train_tokens / step_s / peak,
            "gen_tokens": gen_tokens, "train_tokens": train_tokens}


def our_step(trainer, rss: RssPeak, n_linear: int, peak: float) -> tuple[dict, dict]:
    rss.reset()
    start = time.perf_counter()
    metrics = trainer.training_step()
    trainer.step += 1
    if trainer.tracker:
        trainer.tracker.log(metrics, step=trainer.step)
    total = time.perf_counter() - start
    batch = trainer._last_batch
    gen_tokens = float(batch.response_mask.sum())
    train_tokens = float(batch.attention_mask.sum())
    parts = {"generation": metrics["time/generation_seconds"], "reward": metrics["time/reward_seconds"],
             "logprobs": metrics["time/logprob_seconds"], "update": metrics["time/update_seconds"]}
    parts["logging"] = total - sum(parts.values())  # metrics reduction + the metrics.jsonl write
    scoring = parts["generation"] + parts["reward"] + parts["logprobs"]
    # FLOPs: 2N per token to sample (prefill + decode) and 6N per token to train, per train token.
    return row(total, parts["generation"], scoring, gen_tokens, train_tokens, rss, 8 * n_linear, peak), parts


class Alternate:
    """TrainerCallback body: closes a TRL step, runs one of ours, opens the next TRL step."""

    def __init__(self, args, ours, rss, n_linear, peak, ours_vllm=None):
        self.args, self.ours, self.rss, self.n_linear, self.peak = args, ours, rss, n_linear, peak
        self.ours_vllm = ours_vllm
        self.trl_rows, self.our_rows, self.our_parts, self.record = [], [], [], {}
        self.vllm_rows, self.vllm_parts = [], []
        self._start = None

    def close_trl_step(self):
        if self._start is None:
            return
        step_s = time.perf_counter() - self._start
        out = self.record["_generate_and_score_completions:out"]
        gen_tokens = float(out["completion_mask"].sum())
        train_tokens = gen_tokens + float(out["prompt_mask"].sum())
        self.trl_rows.append(row(step_s, self.record["_generate"], self.record["_generate_and_score_completions"],
                                 gen_tokens, train_tokens, self.rss, 8 * self.n_linear, self.peak))
        self.record.clear()
        self._start = None
        print_step(len(self.trl_rows), "trl", self.trl_rows[-1])

    def on_step_begin(self):
        self.close_trl_step()
        if len(self.our_rows) < self.args.steps:
            self.run_ours()
        self.rss.reset()
        self._start = time.perf_counter()

    def run_ours(self):
        r, parts = our_step(self.ours, self.rss, self.n_linear, self.peak)
        self.our_rows.append(r)
        self.our_parts.append(parts)
        print_step(len(self.our_rows), "ours", r)
        if self.ours_vllm is not None:
            r, parts = our_step(self.ours_vllm, self.rss, self.n_linear, self.peak)
            self.vllm_rows.append(r)
            self.vllm_parts.append(parts)
            print_step(len(self.vllm_rows), "ours+vllm", r)


def make_callback(alternate: Alternate):
    from transformers import TrainerCallback

    class _Callback(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            alternate.on_step_begin()

        def on_train_end(self, args, state, control, **kwargs):
            alternate.close_trl_step()

    return _Callback()


# The math check ---------------------------------------------------------------------------------
def logprob_difference(ours, trl, batch, bf16: bool) -> float:
    """Max |our log-prob - TRL's| over response tokens: same model (TRL's copy), same batch."""
    model = trl.model
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                mine = ours.forward(model, batch)[0]
            theirs, _, _ = trl._get_per_token_logps_and_entropies(
                model, batch.input_ids, batch.attention_mask, batch.response_ids.shape[1])
    finally:
        model.train(was_training)
    mask = batch.response_mask.bool()
    return float((mine.float() - theirs.float())[mask].abs().max())


# Printing ---------------------------------------------------------------------------------------
HEADER = (f"{'step':>4} {'who':>9} {'gen tok/s':>10} {'train tok/s':>11} {'step s':>8} {'tok/s':>8} {'RSS GB':>7} "
          f"{'+step GB':>8} {'MFU %':>6}")


def print_step(i: int, who: str, r: dict) -> None:
    print(f"{i:>4} {who:>9} {r['gen_tok_s']:>10.1f} {r['train_tok_s']:>11.1f} {r['step_s']:>8.2f} "
          f"{r['tok_s']:>8.1f} {r['rss_gb']:>7.2f} {r['rss_step_gb']:>8.2f} {100 * r['mfu']:>6.2f}", flush=True)


def medians(rows: list[dict], warmup: int) -> dict:
    kept = rows[warmup:] if len(rows) > warmup else rows
    return {k: statistics.median(r[k] for r in kept) for k in rows[0]}


def main(argv=None):
    args = parse_args(argv)
    from algos.device import resolve_device_dtype

    device, dtype = resolve_device_dtype(args.device, args.dtype)
    if device.type == "cpu":  # the trainer's Accelerator takes the CPU even where CUDA exists
        os.environ["ACCELERATE_USE_CPU"] = "true"
    args.bf16 = dtype == torch.bfloat16 if args.dtype != "auto" else (args.bf16 or device.type == "cuda")
    args.use_cpu = device.type == "cpu"
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["REPRO_RL_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    work = Path(tempfile.mkdtemp(prefix="bench_rl_step."))
    if args.model == "tiny":
        from tests.conftest import make_tiny_model

        model_path = str(make_tiny_model(work / "tiny"))
    else:
        from algos.models import resolve_model_path

        model_path = resolve_model_path(args.model)
    threads = torch.get_num_threads()
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    peak = peaks["bf16" if args.bf16 else "fp32"]
    print(f"[bench] {psutil.cpu_count(logical=True)} logical CPUs, torch {torch.__version__}, {threads} threads; "
          f"matmul peak fp32 {peaks['fp32'] / 1e9:.1f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s "
          f"(bf16/fp32 {peaks['bf16'] / peaks['fp32']:.2f}x)", flush=True)

    ours = build_ours(args, model_path, str(work / "ours"))
    n_linear = linear_weights(ours.policy)
    count = (args.steps + 1) * args.num_prompts
    records = [ours.train_records[i] for i in ours.sampler.indices(0, count)]
    prompts = [ours.prompt_text(r) for r in records]
    answers = [str(r["answer"]) for r in records]
    print(f"[bench] model {args.model} ({n_linear / 1e6:.1f}M linear weights), {args.num_prompts} prompts x "
          f"G={args.num_generations}, <= {args.max_completion_length} new tokens, "
          f"{'bf16' if args.bf16 else 'fp32'}, ours samples with "
          f"{'model.generate' if args.hf_generate else 'its finished-row-dropping loop'}", flush=True)

    rss = RssPeak()
    if args.trl_vllm_child:  # TRL with its colocated vLLM engine, alone in this process
        del ours
        alternate = Alternate(args, None, rss, n_linear, peak)
        alternate.args = argparse.Namespace(**{**vars(args), "steps": 0})  # no steps of ours in here
        trl = build_trl(args, model_path, str(work / "trl"), prompts, answers, make_callback(alternate), use_vllm=True)
        for name in ("_generate", "_generate_and_score_completions"):
            wrap_timed(trl, name, alternate.record)
        trl.train()
        print("TRL_VLLM " + json.dumps(medians(alternate.trl_rows, args.warmup)), flush=True)
        return
    ours_vllm = None
    if args.use_vllm:
        ours_vllm = build_ours(args, model_path, str(work / "ours_vllm"), use_vllm=True)
    alternate = Alternate(args, ours, rss, n_linear, peak, ours_vllm)
    print(HEADER)
    trl = None
    if args.skip_trl:
        for _ in range(args.steps):
            alternate.run_ours()
    else:
        trl = build_trl(args, model_path, str(work / "trl"), prompts, answers, make_callback(alternate))
        for name in ("_generate", "_generate_and_score_completions"):
            wrap_timed(trl, name, alternate.record)
        trl.train()
    rss.close()

    mine = medians(alternate.our_rows, args.warmup)
    print(f"\n[bench] medians over steps {args.warmup + 1}..{args.steps}")
    print(HEADER)
    print_step(0, "ours", mine)
    if trl is not None:
        theirs = medians(alternate.trl_rows, args.warmup)
        print_step(0, "trl", theirs)
        print(f"[bench] ours/TRL: generation tokens/s {mine['gen_tok_s'] / theirs['gen_tok_s']:.2f}x, training "
              f"tokens/s {mine['train_tok_s'] / theirs['train_tok_s']:.2f}x, step time "
              f"{mine['step_s'] / theirs['step_s']:.2f}x, total tokens/s {mine['tok_s'] / theirs['tok_s']:.2f}x, "
              f"memory added during the step {mine['rss_step_gb']:.2f} vs {theirs['rss_step_gb']:.2f} GB")
    for who, parts in (("our step", alternate.our_parts), ("our step with vLLM", alternate.vllm_parts)):
        kept = parts[args.warmup:] or parts
        if not kept:
            continue
        total = sum(sum(p.values()) for p in kept)
        shares = ", ".join(f"{k} {100 * sum(p[k] for p in kept) / total:.1f}%" for k in kept[0])
        print(f"[bench] {who}: {shares}")
    if ours_vllm is not None:
        report_vllm(args, mine, medians(alternate.vllm_rows, args.warmup),
                    medians(alternate.trl_rows, args.warmup) if trl is not None else None, argv)
    print(f"[bench] peak RSS of the whole process: {rss.process.memory_info().rss / 2**30:.2f} GB now, "
          f"max during steps {max(r['rss_gb'] for r in alternate.our_rows + alternate.trl_rows):.2f} GB")
    if trl is not None:
        diff = logprob_difference(ours, trl, ours._last_batch, args.bf16)
        verdict = ("bf16: reported only" if args.bf16 else
                   "OK" if diff < LOGPROB_TOLERANCE else f"MISMATCH (> {LOGPROB_TOLERANCE:g})")
        print(f"[bench] per-token log-probs, ours vs TRL on one batch ({int(ours._last_batch.response_mask.sum())} "
              f"tokens): max |diff| = {diff:.2e} -> {verdict}")


def ratio_line(name: str, a: dict, b: dict) -> str:
    return (f"[bench] ours+vLLM / {name}: step time {b['step_s'] / a['step_s']:.2f}x faster, generation tokens/s "
            f"{a['gen_tok_s'] / b['gen_tok_s']:.2f}x, total tokens/s {a['tok_s'] / b['tok_s']:.2f}x")


def report_vllm(args, ours: dict, ours_vllm: dict, trl: dict | None, argv) -> None:
    """Medians of ours+vLLM against ours and TRL, then TRL with vLLM from a child process."""
    print(f"\n[bench] with vLLM (medians over steps {args.warmup + 1}..{args.steps}; its step includes the weight sync)")
    print(HEADER)
    print_step(0, "ours+vllm", ours_vllm)
    print(ratio_line("ours (our sampler)", ours_vllm, ours))
    if trl is not None:
        print(ratio_line("TRL", ours_vllm, trl))
    if args.skip_trl:
        return
    child = subprocess.run([sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--trl_vllm_child"],
                           capture_output=True, text=True, env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                                                                 "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                                                                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29517"})
    lines = [l for l in child.stdout.splitlines() if l.startswith("TRL_VLLM ")]
    if child.returncode != 0 or not lines:
        errors = [l for l in child.stderr.strip().splitlines() if l.strip()]
        print(f"[bench] TRL with use_vllm=True, vllm_mode='colocate' did not run: {errors[-1] if errors else child.returncode}")
        return
    trl_vllm = json.loads(lines[-1][len("TRL_VLLM "):])
    print_step(0, "trl+vllm", trl_vllm)
    print(ratio_line("TRL+vLLM", ours_vllm, trl_vllm))


if __name__ == "__main__":
    main()
