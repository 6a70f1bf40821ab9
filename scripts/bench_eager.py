"""EAGER benchmark, in one run:

(a) generated tokens (a child's prefix copied from its parent is not counted), sequences per prompt, Pass@k, Cons@k and PassRate of EAGER-init, EAGER-adapt,
    full EAGER (verifier = the gold answer; at --full_threshold when given, as the reference runs the full
    method at a higher theta than EAGER-init) and full parallel sampling at the same M, on held-out
    problems (default: 50 held-out problems of the quickstart's arithmetic task; --dataset thinking for the
    thinking task's, with --model smollm2-135m-thinking); then full EAGER against parallel problem by
    problem (solved by both, by one only, by neither) with a 95% bootstrap interval of their Pass@k
    difference over problems;
(b) wall time of the batched decoder versus the same algorithm run one prompt at a time.

    python scripts/bench_eager.py --model runs/quickstart_grpo/final --num_problems 50 --m 8
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from algos.data import DEFAULT_PROMPT_TEMPLATE, ArithmeticTask, build_prompt, load_records  # noqa: E402
from algos.rollout.eager import EagerParams, eager_generate  # noqa: E402
from algos.rollout.eager_budget import eager_sample  # noqa: E402
from algos.rollout.eager_engine import end_think_ids  # noqa: E402
from algos.device import add_device_arguments, resolve_device_dtype  # noqa: E402
from algos.models import load_causal_lm, load_tokenizer  # noqa: E402
from rewards.metrics import paired_pass_difference, sample_metrics  # noqa: E402
from rewards.verify import is_correct  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="HF id, local path or the default model")
    ap.add_argument("--dataset", default="arithmetic",
                    help="arithmetic or thinking (test split), gsm8k, or a dataset path")
    ap.add_argument("--arithmetic_digits", type=int, default=1)
    ap.add_argument("--arithmetic_operators", default="+-*")
    ap.add_argument("--arithmetic_test_fraction", type=float, default=0.7,
                    help="as in training; the defaults match configs/quickstart_grpo.yaml's held-out problems")
    ap.add_argument("--prompt_template", default=DEFAULT_PROMPT_TEMPLATE)
    ap.add_argument("--num_problems", type=int, default=50)
    ap.add_argument("--m", type=int, default=8, help="EAGER cap M = full-parallel samples per prompt")
    ap.add_argument("--threshold", type=float, default=2.0, help="EAGER entropy threshold theta (nats)")
    ap.add_argument("--full_threshold", type=float, default=None,
                    help="theta for full EAGER (default: --threshold); the reference runs EAGER-init at about 2.0 "
                         "and the full method at 2.2-2.7")
    ap.add_argument("--sample_fork", action="store_true",
                    help="draw both fork tokens of a branch from the policy without replacement (our option; "
                         "the reference takes top-1 / top-2)")
    ap.add_argument("--dynamic_threshold", action="store_true",
                    help="theta_eff = max(theta, 99th percentile of the prompt's entropies so far), on in the "
                         "reference (the trainer's --eager_dynamic_threshold)")
    ap.add_argument("--max_new_tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--timing_prompts", type=int, default=16, help="prompts for the batched-vs-serial timing (0 skips it)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    add_device_arguments(ap)
    args = ap.parse_args(argv)
    for name in ("threshold", "full_threshold"):
        value = getattr(args, name)
        if value is not None and not value >= 0:
            ap.error(f"--{name} must be an entropy in nats (0 or more), got {value}")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tok = load_tokenizer(args.model)
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    model = load_causal_lm(args.model, dtype=dtype).to(device).eval()
    if args.dataset == "arithmetic":
        task = ArithmeticTask(args.arithmetic_digits, 2, args.arithmetic_operators, args.arithmetic_test_fraction)
        records = task.generate(args.num_problems, seed=args.seed, split="test")
    elif args.dataset == "thinking":
        records = load_records("thinking", split="test", n=args.num_problems, seed=args.seed)
    else:
        records = load_records(args.dataset)[-args.num_problems:]
    prompts = [build_prompt(tok, r["question"], args.prompt_template, None, True) for r in records]
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    ids, mask = enc.input_ids.to(device), enc.attention_mask.to(device)
    golds = [r["answer"] for r in records]
    eos = [tok.eos_token_id]
    params = EagerParams(max_sequences=args.m, threshold=args.threshold, max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, sample_fork=args.sample_fork,
                         dynamic_threshold=args.dynamic_threshold)

    def verifier(q, seqs):
        return [is_correct(t, golds[q]) for t in tok.batch_decode([s.token_ids for s in seqs],
                                                                 skip_special_tokens=True)]

    full_params = params if args.full_threshold is None else replace(params, threshold=args.full_threshold)
    full_theta = "" if args.full_threshold is None else f" (full: {args.full_threshold})"
    print(f"model {args.model} | {len(records)} problems | M={args.m} theta={args.threshold}{full_theta} "
          f"T={args.temperature} max_new_tokens={args.max_new_tokens}"
          f"{' | sampled forks' if args.sample_fork else ''}{' | dynamic threshold' if args.dynamic_threshold else ''}"
          f" | torch threads {torch.get_num_threads()}")
    print(f"{'method':<14}{'tokens':>9}{'tok/prompt':>12}{'seq/prompt':>12}{'Pass@k':>8}{'Cons@k':>8}"
          f"{'PassRate':>10}{'wall s':>8}")
    rows, solved = {}, {}
    for mode in ("init", "adapt", "full", "parallel"):
        t0 = time.perf_counter()
        result = eager_sample(model, ids, mask, full_params if mode == "full" else params, eos, mode=mode, verifier=verifier,
                              end_think_ids=end_think_ids(tok), generator=torch.Generator(device=device).manual_seed(args.seed))
        wall = time.perf_counter() - t0
        groups = [tok.batch_decode([s.token_ids for s in g], skip_special_tokens=True)
                  for g in result.per_prompt(len(prompts))]
        m = sample_metrics(groups, golds)
        tokens = sum(s.generated_tokens for s in result.sequences)  # a child's copied prefix is not generated
        rows[mode] = tokens
        solved[mode] = [any(is_correct(c, gold) for c in group) for group, gold in zip(groups, golds)]
        print(f"{mode:<14}{tokens:>9}{tokens / len(prompts):>12.1f}{m['samples_per_prompt']:>12.2f}"
              f"{m['pass_at_k']:>8.3f}{m['cons_at_k']:>8.3f}{m['pass_rate']:>10.3f}{wall:>8.1f}")
    for mode in ("init", "adapt", "full"):
        print(f"tokens {mode} / parallel: {rows[mode] / rows['parallel']:.3f}")
    pair = paired_pass_difference(solved["full"], solved["parallel"])
    low, high = pair["interval"]
    print(f"full vs parallel, problem by problem: both {pair['both']}, full only {pair['a_only']}, "
          f"parallel only {pair['b_only']}, neither {pair['neither']}; Pass@k difference {pair['difference']:+.3f}, "
          f"95% bootstrap interval over problems [{low:+.3f}, {high:+.3f}]")

    # (b) batched across prompts vs one prompt at a time: same algorithm, same settings.
    n = min(args.timing_prompts, len(prompts))
    if n == 0:
        return
    sub_ids, sub_mask = ids[:n], mask[:n]
    t0 = time.perf_counter()
    batched = eager_generate(model, sub_ids, sub_mask, params, eos, generator=torch.Generator(device=device).manual_seed(1))
    t_batched = time.perf_counter() - t0
    t0 = time.perf_counter()
    serial_tokens = 0
    for i in range(n):
        keep = sub_mask[i].bool()
        one = eager_generate(model, sub_ids[i:i + 1, keep], sub_mask[i:i + 1, keep], params, eos,
                             generator=torch.Generator(device=device).manual_seed(1 + i))
        serial_tokens += sum(len(s.token_ids) for s in one)
    t_serial = time.perf_counter() - t0
    batched_tokens = sum(len(s.token_ids) for s in batched)
    print(f"\n{n} prompts, EAGER-init: batched {t_batched:.1f} s ({batched_tokens} tokens, "
          f"{batched_tokens / t_batched:.0f} tok/s) | one prompt at a time {t_serial:.1f} s "
          f"({serial_tokens} tokens, {serial_tokens / t_serial:.0f} tok/s)")
    print(f"speed-up (tokens/s, batched / one at a time): "
          f"{(batched_tokens / t_batched) / (serial_tokens / t_serial):.2f}x")


if __name__ == "__main__":
    main()
