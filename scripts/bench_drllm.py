#!/usr/bin/env python
"""Benchmark Dr.LLM routed generation against the dense model, in one run.

For one prompt (default: a two-digit addition in the project's prompt format), batch
``--batch_size``, greedy, exactly ``--max_new_tokens`` new tokens (EOS ignored so every path
generates the same number of tokens), under ``torch.no_grad`` and ``--threads`` CPU threads:

  hf        HF ``model.generate`` (dense), for reference;
  dense     ``RoutedModel.generate`` along the dense path [0 .. L-1];
  skip k    ``RoutedModel.generate`` along a path without k blocks (evenly spread over blocks
            1 .. L-2), for each k in ``--skips``;
  router    ``RoutedModel.generate`` with the router deciding each block once at prefill
            (``--router DIR``: a trained export; else a freshly initialised router, which only
            measures the overhead).

Each is run once to warm up, then ``--repeats`` times; the median wall time is reported.
Time saved = 1 - t / t_dense; ideal = blocks skipped per token / L (embedding and LM head are
not skippable, so the ratio saved / ideal is below 1 on a small model); router overhead = time
spent inside the router's decisions / that generation's wall time (target < 1%). Prints figures
only: no PASS/FAIL, exit code 0.

Example:  python scripts/bench_drllm.py --threads 1 --router runs/drllm/router
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from algos.data import build_prompt  # noqa: E402
from algos.models import load_causal_lm, load_tokenizer  # noqa: E402
from routers.export import load_router  # noqa: E402
from routers.routed_model import RoutedModel  # noqa: E402
from routers.router import PathRouter  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Time Dr.LLM routed generation vs the dense model.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model_name_or_path", default=None, help="HF id or path; default: embedded SmolLM2-135M")
    p.add_argument("--router", default=None, help="router export dir (train/drllm_router.py); default: untrained")
    p.add_argument("--skips", default="0,3,6,10", help="comma-separated numbers of blocks to skip")
    p.add_argument("--max_new_tokens", type=int, default=64, help="new tokens per generation (EOS ignored)")
    p.add_argument("--batch_size", type=int, default=1, help="copies of the prompt per batch")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per configuration (median reported)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--question", default="What is 47 + 38?", help="the question put in the prompt template")
    p.add_argument("--p", type=float, default=None, help="router knob p in [-1, 1] (default: the export's)")
    args = p.parse_args(argv)
    try:
        args.skips = [int(k) for k in args.skips.split(",") if k.strip()]
    except ValueError:
        p.error(f"--skips must be comma-separated integers, got '{args.skips}'")
    if min(args.max_new_tokens, args.batch_size, args.repeats, args.threads) < 1:
        p.error("--max_new_tokens, --batch_size, --repeats and --threads must be >= 1")
    return args


def skip_path(num_layers: int, k: int) -> list[int]:
    """The dense path without k blocks evenly spread over 1 .. L-2 (the first and last kept)."""
    if not 0 <= k <= num_layers - 2:
        raise SystemExit(f"error: --skips values must lie in [0, {num_layers - 2}] for a {num_layers}-block model")
    inner = list(range(1, num_layers - 1))
    drop = {inner[round(i * (len(inner) - 1) / max(k - 1, 1))] for i in range(k)} if k else set()
    return [b for b in range(num_layers) if b not in drop]


def timed(fn, repeats: int) -> tuple[float, object]:
    """(median seconds over ``repeats`` runs after one warm-up, last result)."""
    out = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


class TimedDecider:
    """Wraps ``router.decide``; accumulates the seconds spent in routing decisions."""

    def __init__(self, router: PathRouter, p: float):
        self.router, self.p, self.seconds = router, p, 0.0

    def __call__(self, layer_idx, hidden, mask):
        start = time.perf_counter()
        actions = self.router.decide(layer_idx, hidden, mask, self.p)
        self.seconds += time.perf_counter() - start
        return actions


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(args.model_name_or_path)
    model = load_causal_lm(args.model_name_or_path).eval()
    routed = RoutedModel(model)
    L = routed.num_layers
    if args.router:
        router, meta = load_router(args.router, model)
        p = meta["p_default"] if args.p is None else args.p
    else:
        torch.manual_seed(0)
        router, p = PathRouter(L, model.config.hidden_size).eval(), (-0.5 if args.p is None else args.p)
    paths = {k: skip_path(L, k) for k in args.skips}  # validate before timing
    prompt = build_prompt(tokenizer, args.question)
    enc = tokenizer([prompt] * args.batch_size, return_tensors="pt", add_special_tokens=False)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    gen_kwargs = {"max_new_tokens": args.max_new_tokens, "eos_token_id": [], "pad_token_id": tokenizer.pad_token_id}
    new_tokens = args.max_new_tokens * args.batch_size
    print(f"[bench_drllm] {model.config._name_or_path} ({L} blocks), prompt {ids.shape[1]} tokens x batch "
          f"{args.batch_size}, {args.max_new_tokens} new tokens, {args.repeats} repeats (median), "
          f"{args.threads} thread(s), torch {torch.__version__}, {platform.processor() or platform.machine()}")

    with torch.no_grad():
        # HF: EOS suppressed until max_new_tokens (min_new_tokens), the same number of forward passes
        t_hf, _ = timed(lambda: model.generate(ids, attention_mask=mask, do_sample=False,
                                               max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens,
                                               pad_token_id=tokenizer.pad_token_id), args.repeats)
        rows = []
        for k, path in paths.items():
            t, _ = timed(lambda path=path: routed.generate(ids, mask, actions=path, **gen_kwargs), args.repeats)
            rows.append((f"skip {k}", len(path), t))
        decider = TimedDecider(router, p)
        t_router, out = timed(lambda: routed.generate(ids, mask, decide=decider, **gen_kwargs), args.repeats)
        router_seconds = decider.seconds / (args.repeats + 1)  # the warm-up also routed once
        rows.append(("router", out.mean_layers_executed, t_router))

    t_dense = next((t for name, _, t in rows if name == "skip 0"), None)
    if t_dense is None:
        with torch.no_grad():
            t_dense, _ = timed(lambda: routed.generate(ids, mask, actions=list(range(L)), **gen_kwargs), args.repeats)
    print(f"{'config':<10} {'blocks':>7} {'seconds':>8} {'tok/s':>7} {'saved':>7} {'ideal':>7} {'ratio':>6}")
    print(f"{'hf dense':<10} {L:>7} {t_hf:>8.3f} {new_tokens / t_hf:>7.1f}")
    for name, blocks, t in rows:
        saved, ideal = 1.0 - t / t_dense, (L - blocks) / L
        ratio = f"{saved / ideal:>6.2f}" if abs(ideal) > 1e-9 else f"{'-':>6}"
        print(f"{name:<10} {blocks:>7.2f} {t:>8.3f} {new_tokens / t:>7.1f} {saved:>7.1%} {ideal:>7.1%} {ratio}")
    print(f"[bench_drllm] RoutedModel dense vs HF generate: {t_dense / t_hf - 1:+.1%} wall time")
    print(f"[bench_drllm] router ({'trained: ' + args.router if args.router else 'untrained'}, p={p}): path of "
          f"{out.mean_layers_executed:.2f} blocks; decisions took {router_seconds * 1e3:.2f} ms = "
          f"{router_seconds / t_router:.3%} of the generation's {t_router:.3f} s (target < 1%)")


if __name__ == "__main__":
    main()
