#!/usr/bin/env python
"""Benchmark Dr.LLM routed generation against the dense model, in one run.

For one prompt (default: "What is 4 + 7?" in the router's training template, else the project's), batch
``--batch_size``, greedy, exactly ``--max_new_tokens`` new tokens (EOS ignored so every path
generates the same number of tokens), under ``torch.no_grad`` and ``--threads`` CPU threads:

  hf dense  HF ``model.generate`` (dense), for reference;
  dense     ``RoutedModel.generate`` along the dense path [0 .. L-1];
  skip k    ``RoutedModel.generate`` along a path without k blocks (evenly spread over blocks
            1 .. L-2), for each k in ``--skips``;
  router    ``RoutedModel.generate`` with the router deciding each block once at prefill
            (``--router DIR``: a trained export; else a freshly initialised router, which only
            measures the overhead).

Each runs once to warm up, then ``--repeats`` rounds run every configuration once (round robin,
so load from other processes hits all alike); the minimum and median wall times are reported.
Time saved = 1 - t / t_dense on the minimum times; ideal = blocks skipped per token / L (the
embedding and LM head cannot be skipped, so saved / ideal stays below 1 on a small model);
router overhead = seconds inside the router's decisions / that generation's median wall time
(target < 1%). Prints figures only: no PASS/FAIL, exit code 0.

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

from algos.data import DEFAULT_PROMPT_TEMPLATE, build_prompt  # noqa: E402
from algos.device import add_device_arguments, resolve_device_dtype  # noqa: E402
from algos.models import load_causal_lm, load_tokenizer  # noqa: E402
from routers.export import load_router  # noqa: E402
from routers.routed_model import RoutedModel  # noqa: E402
from routers.router import PathRouter  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Time Dr.LLM routed generation vs the dense model.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model_name_or_path", default=None, help="HF id or path; default: embedded SmolLM2-135M")
    p.add_argument("--router", default=None, help="router export dir (train/drllm_router.py); default: untrained")
    p.add_argument("--skips", default="4,8", help="comma-separated numbers of blocks to skip (dense is always run)")
    p.add_argument("--max_new_tokens", type=int, default=64, help="new tokens per generation (EOS ignored)")
    p.add_argument("--batch_size", type=int, default=1, help="copies of the prompt per batch")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (each configuration once per round)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--question", default="What is 4 + 7?", help="the question put in the prompt template")
    p.add_argument("--prompt_template", default=None,
                   help="prompt with {question}; default: the router export's training template, else the project's")
    p.add_argument("--p", type=float, default=None, help="router knob p in [-1, 1] (default: the export's)")
    add_device_arguments(p)
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


def timed_round_robin(configs: dict, repeats: int) -> tuple[dict, dict]:
    """Each configuration once to warm up, then ``repeats`` rounds running every configuration
    once per round (so load from other processes hits all of them alike). Returns
    ({name: [seconds per timed run]}, {name: last result})."""
    results = {name: fn() for name, fn in configs.items()}
    times = {name: [] for name in configs}
    for _ in range(repeats):
        for name, fn in configs.items():
            start = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - start)
    return times, results


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
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    model = load_causal_lm(args.model_name_or_path, dtype=dtype).to(device).eval()
    routed = RoutedModel(model)
    L = routed.num_layers
    if args.router:
        router, meta = load_router(args.router, model, device=device)
        p = meta["p_default"] if args.p is None else args.p
    else:
        torch.manual_seed(0)
        router, p = PathRouter(L, model.config.hidden_size).to(device).eval(), (-0.5 if args.p is None else args.p)
    paths = {k: skip_path(L, k) for k in args.skips}  # validate before timing
    template = args.prompt_template or (meta.get("training_args", {}).get("prompt_template") if args.router else None)
    prompt = build_prompt(tokenizer, args.question, template or DEFAULT_PROMPT_TEMPLATE)
    enc = tokenizer([prompt] * args.batch_size, return_tensors="pt", add_special_tokens=False)
    ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    gen_kwargs = {"max_new_tokens": args.max_new_tokens, "eos_token_id": [], "pad_token_id": tokenizer.pad_token_id}
    new_tokens = args.max_new_tokens * args.batch_size
    print(f"[bench_drllm] {model.config._name_or_path} ({L} blocks), prompt {ids.shape[1]} tokens x batch "
          f"{args.batch_size}, {args.max_new_tokens} new tokens, {args.repeats} timed rounds, "
          f"{args.threads} thread(s), torch {torch.__version__}, {platform.processor() or platform.machine()}")

    decider = TimedDecider(router, p)
    configs = {"hf dense": lambda: model.generate(ids, attention_mask=mask, do_sample=False,
                                                  max_new_tokens=args.max_new_tokens,
                                                  min_new_tokens=args.max_new_tokens,  # same token count
                                                  pad_token_id=tokenizer.pad_token_id),
               "dense": lambda: routed.generate(ids, mask, actions=list(range(L)), **gen_kwargs)}
    for k, path in paths.items():
        if k:
            configs[f"skip {k}"] = lambda path=path: routed.generate(ids, mask, actions=path, **gen_kwargs)
    configs["router"] = lambda: routed.generate(ids, mask, decide=decider, **gen_kwargs)
    with torch.no_grad():
        times, results = timed_round_robin(configs, args.repeats)
    router_seconds = decider.seconds / (args.repeats + 1)  # the warm-up routed once too
    blocks = {"hf dense": L, "dense": L, **{f"skip {k}": len(pth) for k, pth in paths.items() if k},
              "router": results["router"].mean_layers_executed}
    best = {name: min(ts) for name, ts in times.items()}
    mid = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"{'config':<9} {'blocks':>6} {'min s':>7} {'median s':>8} {'tok/s':>6} {'saved':>7} {'ideal':>6} {'ratio':>6}")
    for name in configs:
        saved, ideal = 1.0 - best[name] / best["dense"], (L - blocks[name]) / L
        ratio = f"{saved / ideal:>6.2f}" if ideal > 1e-9 else f"{'-':>6}"
        print(f"{name:<9} {blocks[name]:>6.2f} {best[name]:>7.3f} {mid[name]:>8.3f} {new_tokens / best[name]:>6.1f} "
              f"{saved:>7.1%} {ideal:>6.1%} {ratio}")
    print("[bench_drllm] saved = 1 - t/t_dense on the min times; ideal = blocks skipped / L; ratio = saved / ideal")
    print(f"[bench_drllm] RoutedModel dense vs HF generate: {best['dense'] / best['hf dense'] - 1:+.1%} wall time")
    print(f"[bench_drllm] router ({'trained: ' + args.router if args.router else 'untrained'}, p={p}): path of "
          f"{blocks['router']:.2f} blocks; decisions took {router_seconds * 1e3:.2f} ms per generation = "
          f"{router_seconds / mid['router']:.3%} of its median {mid['router']:.3f} s (target < 1%)")


if __name__ == "__main__":
    main()
