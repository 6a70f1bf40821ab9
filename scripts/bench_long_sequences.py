"""Peak memory and step time of the policy-loss update for long completions: full logits vs chunked.

    python scripts/bench_long_sequences.py                                   # 1k / 4k / 8k, default model
    python scripts/bench_long_sequences.py --lengths 128,256 --repeats 1     # a quick check on a CPU

One step = forward + backward of a GRPO-style policy loss, -mean_t(A * log p(y_t)), over ``--batch_size``
rows of a ``--prompt_length``-token prompt and an L-token completion (random token ids, fixed seed), with
the model's weights in float32 and the forward under autocast in ``--dtype`` (as the trainer's --bf16):

* full (the trainer with ``--logprobs_chunk_size 0``, and before it had the flag):
  ``model(..., logits_to_keep=L + 1).logits[:, :-1].float() / T`` and ``logprobs_from_logits``: the
  (B, L, V) logits exist in float32, and autograd keeps them;
* chunked (the trainer's default, ``--logprobs_chunk_size 1024``): the model returns its last hidden
  states and no logits, and the output layer runs ``--chunk_size`` tokens at a time, each chunk
  recomputed in the backward pass (``algos.logprobs.logprobs_from_hidden``).

Both go through ``algos.logprobs.response_logprobs``, the function the trainer's forward pass calls.

Each (length, method) runs in a fresh process, so its peak is its own. Peak memory: on CUDA
``torch.cuda.max_memory_allocated`` during the step; on the CPU the highest resident set size seen by a
5 ms sampling thread during the step, minus the size before it ("step GB"), and the process's peak.
Step time: median over ``--repeats`` steps after one warm-up step. The target (issue 17): the chunked
peak at 8k tokens below half of the full one.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from algos.device import add_device_arguments, dtype_name, resolve_device_dtype  # noqa: E402
from scripts.bench_rl_step import RssPeak  # noqa: E402

METHODS = ("full", "chunked")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="HF id, local path or the default model")
    p.add_argument("--lengths", default="1024,4096,8192", help="completion lengths L (comma list)")
    p.add_argument("--batch_size", type=int, default=1, help="rows per step")
    p.add_argument("--prompt_length", type=int, default=64, help="prompt tokens per row")
    p.add_argument("--chunk_size", type=int, default=1024, help="tokens of logits at a time (chunked)")
    p.add_argument("--temperature", type=float, default=0.7, help="divides the logits, as in the trainer")
    p.add_argument("--gradient_checkpointing", action="store_true", help="recompute the blocks' activations")
    p.add_argument("--repeats", type=int, default=2, help="timed steps after one warm-up step")
    p.add_argument("--methods", default=",".join(METHODS), help="comma list of full, chunked")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # "L,method": one measurement
    add_device_arguments(p)
    args = p.parse_args(argv)
    args.length_list = [int(x) for x in args.lengths.split(",") if x.strip()]
    args.method_list = [m for m in args.methods.split(",") if m]
    if any(m not in METHODS for m in args.method_list) or not args.length_list or min(args.length_list) < 1:
        p.error("--methods must name full and/or chunked, --lengths positive integers")
    if min(args.batch_size, args.prompt_length, args.chunk_size, args.repeats) < 1 or args.temperature <= 0:
        p.error("--batch_size, --prompt_length, --chunk_size, --repeats must be >= 1, --temperature > 0")
    return args


def policy_logprobs(model, ids, keep: int, method: str, temperature: float, chunk_size: int):
    """(B, keep - 1) log-probs of ids[:, -keep+1:], as the trainer's forward computes them
    (``algos.logprobs.response_logprobs``) with ``--logprobs_chunk_size 0`` (full) or ``chunk_size``."""
    from algos.logprobs import logits_to_keep, response_logprobs
    from algos.models import output_head

    head = output_head(model) if method == "chunked" else None
    out = model(input_ids=ids, logits_to_keep=logits_to_keep(keep, head is not None, ids.device),
                use_cache=False, output_hidden_states=head is not None)
    return response_logprobs(out, head, ids[:, -(keep - 1):], temperature=temperature, chunk_size=chunk_size)[0]


def child(args) -> dict:
    """One (length, method): load, warm up, time ``repeats`` steps, report peaks as JSON."""
    from algos.models import load_causal_lm

    length, method = args.child.split(",")
    length = int(length)
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    model = load_causal_lm(args.model, dtype=torch.float32).to(device).train()
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.batch_size, args.prompt_length + length), generator=g)
    ids, advantages = ids.to(device), torch.randn(args.batch_size, length, generator=g).to(device)
    cuda = device.type == "cuda"
    rss = None if cuda else RssPeak()

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            logp = policy_logprobs(model, ids, length + 1, method, args.temperature, args.chunk_size)
        loss = -(advantages * logp).mean()
        loss.backward()
        model.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()

    step()  # warm-up (allocator, kernels)
    times = []
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        rss.reset()
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    if cuda:
        peak = torch.cuda.max_memory_allocated()
    else:
        peak, before = rss.peak, rss.start
    return {"length": length, "method": method, "step_s": statistics.median(times), "peak_gb": peak / 2**30,
            "step_gb": (peak - before) / 2**30, "device": str(device), "dtype": dtype_name(dtype),
            "tokens_per_s": args.batch_size * (args.prompt_length + length) / statistics.median(times)}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return 0
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    print(f"[bench_long_sequences] model {args.model} | {device} | weights float32, autocast {dtype_name(dtype)} | "
          f"batch {args.batch_size} x ({args.prompt_length} prompt + L) tokens | chunk {args.chunk_size} | "
          f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'} | median of {args.repeats} steps",
          flush=True)
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    rows = []
    for length in args.length_list:
        for method in args.method_list:
            cmd = [sys.executable, str(Path(__file__).resolve()), *passthrough, "--device", str(device),
                   "--dtype", dtype_name(dtype), "--child", f"{length},{method}"]
            result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            line = next((ln for ln in result.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                tail = (result.stderr.strip().splitlines() or ["no output"])[-1]
                print(f"  L={length} {method}: failed ({tail})", flush=True)
                rows.append({"length": length, "method": method, "failed": tail})
                continue
            rows.append(json.loads(line[len("RESULT "):]))
            r = rows[-1]
            print(f"  L={length:>6} {method:<8} step {r['step_s']:8.3f} s  peak {r['peak_gb']:7.3f} GB  "
                  f"step {r['step_gb']:7.3f} GB  {r['tokens_per_s']:9.1f} tok/s", flush=True)
    print(f"\n{'L':>6} {'full step GB':>13} {'chunked step GB':>16} {'ratio':>6} {'full s':>8} {'chunked s':>10}")
    for length in args.length_list:
        got = {r["method"]: r for r in rows if r["length"] == length and "failed" not in r}
        if set(got) == set(METHODS):
            f, c = got["full"], got["chunked"]
            print(f"{length:>6} {f['step_gb']:>13.3f} {c['step_gb']:>16.3f} {c['step_gb'] / max(f['step_gb'], 1e-9):>6.2f} "
                  f"{f['step_s']:>8.3f} {c['step_s']:>10.3f}")
    print("step GB = peak during the timed steps minus the memory held before them (weights etc.); "
          "target: chunked < 0.5 x full at the longest L")
    return 0


if __name__ == "__main__":
    sys.exit(main())
