#!/usr/bin/env python
"""Benchmark REPRO scoring against a plain policy forward and the k+2-passes reference.

On one batch of rollouts (default: 8 GSM8K prompts, 1 sampled generation each, up to 256 new
tokens, temperature 0.7, fixed seed) this times, in the same run and under ``torch.no_grad``:

  (a) forward   one no-grad forward of the policy over prompt + response for the whole batch, as
                the trainer runs it to get old log-probs (micro-batches of ``--micro_batch_size``,
                position ids from the mask, response logits only, log-probs of the sampled
                tokens), with the same attention implementation as REPRO;
  (b) REPRO     ``ReproReward(top_k=20)(model, tokenizer, batch)``: its full ``__call__`` (planning,
                packed scoring with the same micro-batch size, dual score, rewards);
  (c) reference ``answer_logprob_separate`` for every rollout over the points REPRO chose: one
                full forward per point (k + 2 per rollout).

Each is repeated ``--repeats`` times (the reference ``--ref_repeats`` times: it is by far the
slowest) and the median is reported, with REPRO/forward (target <= 1.5x), reference/REPRO
(target >= 5x) and the largest |J_REPRO - J_reference|. Targets are reported as PASS/MISS; the
exit code is 0 either way.

Sampled responses of a small model may hold fewer than ``top_k`` line breaks, in which case fewer
points are scored than k + 2; the table says so and gives the real number. ``--synthetic_lines N``
instead builds every response from GSM8K solution lines (calculator annotations removed), cycled
and joined with newlines to N lines (not cut at --max_new_tokens), so that top_k = 20 is really
exercised (N = 24 gives 24 candidates, ~400 response tokens); entropies for point
selection then come from one (untimed) teacher-forced pass of the policy.

Example:  python scripts/bench_repro.py                     # sampled rollouts
          python scripts/bench_repro.py --synthetic_lines 24
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from algos.batch import RolloutBatch  # noqa: E402
from algos.data import build_prompt, load_records  # noqa: E402
from algos.logprobs import entropy_from_logits, logprobs_from_logits  # noqa: E402
from algos.device import add_device_arguments, resolve_device_dtype  # noqa: E402
from algos.models import load_causal_lm, load_tokenizer  # noqa: E402
from algos.rollout import HFGenerateEngine, SamplingParams, response_mask_from_ids  # noqa: E402
from rewards.repro import ReproReward, _eval_mode  # noqa: E402
from rewards.repro_packing import answer_logprob_separate  # noqa: E402
from rewards.repro_scoring import line_break_flags  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Time REPRO scoring vs one policy forward vs k+2 separate forwards per rollout.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model_name_or_path", default=None, help="HF id or path; default: embedded SmolLM2-135M-Instruct")
    p.add_argument("--num_prompts", type=int, default=8, help="GSM8K prompts in the batch")
    p.add_argument("--num_generations", type=int, default=1, help="rollouts per prompt")
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt_offset", type=int, default=0, help="index of the first GSM8K record used")
    p.add_argument("--top_k", type=int, default=20, help="REPRO line-break points kept per rollout")
    p.add_argument("--micro_batch_size", type=int, default=8,
                   help="rollouts per forward, for both REPRO's packed pass and the plain forward")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats of (a) and (b); median reported")
    p.add_argument("--ref_repeats", type=int, default=1,
                   help="timed repeats of the (slow) reference (c); median reported")
    p.add_argument("--synthetic_lines", type=int, default=0,
                   help="if > 0, build each response from this many GSM8K solution steps joined with "
                        "newlines (not cut at --max_new_tokens) instead of sampling; 24 exercises top_k=20")
    p.add_argument("--attn_implementation", default="sdpa", help="attention kernel the model is loaded with")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch default)")
    p.add_argument("--skip_reference", action="store_true", help="do not time (c)")
    add_device_arguments(p)
    return p.parse_args(argv)


# --------------------------------------------------------------------------- machine


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line(model) -> str:
    dev = next(model.parameters()).device
    parts = [f"CPU: {cpu_model()} ({os.cpu_count()} logical cores)",
             f"torch {torch.__version__} threads={torch.get_num_threads()}",
             f"device={dev}"]
    if dev.type == "cuda":
        parts.append(torch.cuda.get_device_name(dev))
    try:
        parts.append("loadavg(1m)=%.2f" % os.getloadavg()[0])
    except OSError:
        pass
    return " | ".join(parts)


# --------------------------------------------------------------------------- rollouts


def sampled_batch(model, tokenizer, records, args) -> RolloutBatch:
    prompts = [build_prompt(tokenizer, r["question"]) for r in records]
    extras = {"answer": [r["answer"] for r in records]}
    engine = HFGenerateEngine(tokenizer, SamplingParams(max_new_tokens=args.max_new_tokens,
                                                        temperature=args.temperature))
    torch.manual_seed(args.seed)
    return engine.generate(model, prompts, args.num_generations, extras)


def _solution_lines(solution: str) -> list[str]:
    """Steps of a GSM8K solution: its lines (calculator annotations and the '####' line removed),
    each cut further after sentence/clause punctuation, so a step is a short line as in a CoT."""
    lines = []
    for line in solution.split("\n"):
        line = re.sub(r"<<[^>]*>>", "", line).strip()
        if line and not line.startswith("####"):
            lines.extend(c for c in re.split(r"(?<=[.,;:?!])\s+", line) if c)
    return lines


@torch.no_grad()
def synthetic_batch(model, tokenizer, records, pool, args) -> RolloutBatch:
    """Responses = GSM8K solution steps (this record's first, then the following records'),
    ``--synthetic_lines`` of them joined with newlines, then the boxed answer and EOS. Not cut at
    --max_new_tokens (SmolLM2 spells numbers digit by digit: 20+ lines take ~350 tokens)."""
    engine = HFGenerateEngine(tokenizer, SamplingParams(max_new_tokens=args.max_new_tokens,
                                                        temperature=args.temperature))
    device = next(model.parameters()).device
    prompts, answers, responses = [], [], []
    eos = engine.eos_ids[0]
    for i, rec in enumerate(records):
        lines, j = [], 0
        while len(lines) < args.synthetic_lines:
            lines.extend(_solution_lines(pool[(i + j) % len(pool)]["solution"]))
            j += 1
        text = "\n".join(lines[: args.synthetic_lines]) + f"\nThe answer is \\boxed{{{rec['answer']}}}."
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
        for _ in range(args.num_generations):
            prompts.append(build_prompt(tokenizer, rec["question"]))
            answers.append(rec["answer"])
            responses.append(ids)
    prompt_ids, prompt_mask = engine.tokenize_prompts(prompts, device)
    T = max(map(len, responses))
    pad = tokenizer.pad_token_id
    response_ids = torch.tensor([r + [pad] * (T - len(r)) for r in responses], device=device)
    response_mask, reasons = response_mask_from_ids(response_ids, engine.eos_ids)
    # entropies of the policy at each response position (teacher forced, untimed), for point selection
    input_ids = torch.cat([prompt_ids, response_ids], 1)
    mask = torch.cat([prompt_mask, response_mask], 1)
    pos = (mask.long().cumsum(1) - 1).clamp(min=0)
    ents, lps = [], []
    was_training = model.training
    model.eval()
    try:
        for lo in range(0, len(prompts), args.micro_batch_size):
            sl = slice(lo, lo + args.micro_batch_size)
            logits = model(input_ids=input_ids[sl], attention_mask=mask[sl], position_ids=pos[sl],
                           logits_to_keep=T + 1, use_cache=False).logits[:, :-1].float() / args.temperature
            ents.append(entropy_from_logits(logits))
            lps.append(logprobs_from_logits(logits, response_ids[sl]))
    finally:
        model.train(was_training)
    return RolloutBatch(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=response_ids,
        response_mask=response_mask, logprobs=torch.cat(lps) * response_mask,
        entropies=torch.cat(ents) * response_mask,
        group_ids=torch.arange(len(records), device=device).repeat_interleave(args.num_generations),
        prompts=prompts, completions=engine.decode(response_ids, response_mask), finish_reasons=reasons,
        extras={"answer": answers})


# --------------------------------------------------------------------------- the timed work


@torch.no_grad()
def policy_forward(model, batch: RolloutBatch, micro_batch_size: int, temperature: float) -> torch.Tensor:
    """The trainer's no-grad forward (old log-probs): micro-batched, positions skip left padding,
    logits for the response positions only, log-prob of each sampled token."""
    out = []
    with _eval_mode(model):
        for lo in range(0, len(batch), micro_batch_size):
            sub = batch.select(list(range(lo, min(lo + micro_batch_size, len(batch)))))
            ids, mask = sub.input_ids, sub.attention_mask
            pos = (mask.long().cumsum(1) - 1).clamp(min=0)
            keep = sub.response_ids.shape[1] + 1
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=keep,
                           use_cache=False).logits
            out.append(logprobs_from_logits(logits[:, :-1].float() / temperature, sub.response_ids))
    return torch.cat(out)


@torch.no_grad()
def reference_scores(model, requests) -> list[torch.Tensor]:
    with _eval_mode(model):
        return [answer_logprob_separate(model, r.prompt_ids, r.response_ids, r.points, r.answer_ids)
                for r in requests]


def _sync(model):
    if next(model.parameters()).device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, model):
    _sync(model)
    t0 = time.perf_counter()
    result = fn()
    _sync(model)
    return time.perf_counter() - t0, result


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_load = time.perf_counter()
    tokenizer = load_tokenizer(args.model_name_or_path)
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    model = load_causal_lm(args.model_name_or_path, dtype=dtype, attn_implementation=args.attn_implementation)
    model = model.to(device).eval()
    print(f"[bench] model loaded in {time.perf_counter() - t_load:.1f}s "
          f"(attn={model.config._attn_implementation})", flush=True)

    n_pool = args.prompt_offset + args.num_prompts + (64 if args.synthetic_lines else 0)
    pool = load_records("gsm8k", n=n_pool)
    records = pool[args.prompt_offset: args.prompt_offset + args.num_prompts]

    t_gen = time.perf_counter()
    if args.synthetic_lines > 0:
        batch = synthetic_batch(model, tokenizer, records, pool, args)
        source = f"synthetic ({args.synthetic_lines} GSM8K solution lines each)"
    else:
        batch = sampled_batch(model, tokenizer, records, args)
        source = f"sampled (T={args.temperature}, seed={args.seed})"
    print(f"[bench] built {len(batch)} rollouts ({source}) in {time.perf_counter() - t_gen:.1f}s", flush=True)

    reward = ReproReward(top_k=args.top_k, micro_batch_size=args.micro_batch_size)
    answers = [str(a) for a in batch.extras["answer"]]
    all_points, _, requests = reward.plan(tokenizer, batch, answers)
    resp_len = batch.response_mask.sum(1).float()
    prompt_len = batch.prompt_mask.sum(1).float()
    n_points = [len(p) for p in all_points]
    n_candidates = []  # line-break candidates per rollout (before top_k)
    for req in requests:
        flags = line_break_flags(tokenizer, req.response_ids)
        n_candidates.append(sum(flags[: len(req.response_ids) - 1]))
    target_points = args.top_k + 2
    short = [i for i, k in enumerate(n_points) if k < target_points]

    # warm-up (untimed): one rollout through both code paths
    policy_forward(model, batch.select([0]), args.micro_batch_size, args.temperature)
    reward(model, tokenizer, batch.select([0]), answers[:1])

    t_fwd, t_repro = [], []
    out = None
    for _ in range(args.repeats):  # interleaved, so background load hits both alike
        dt, _ = timed(lambda: policy_forward(model, batch, args.micro_batch_size, args.temperature), model)
        t_fwd.append(dt)
        dt, out = timed(lambda: reward(model, tokenizer, batch, answers), model)
        t_repro.append(dt)
    t_ref, ref_J = [], None
    if not args.skip_reference:
        for _ in range(args.ref_repeats):
            dt, ref_J = timed(lambda: reference_scores(model, requests), model)
            t_ref.append(dt)

    # J agreement on the rollouts that were scored (rows with a non-empty thinking region)
    max_diff = None
    if ref_J is not None:
        scored = [J for J in out.J if J.numel()]
        max_diff = max((float((a - b).abs().max()) for a, b in zip(scored, ref_J)), default=0.0)

    med = statistics.median
    f, r = med(t_fwd), med(t_repro)
    c = med(t_ref) if t_ref else None
    ratio_rf = r / f
    ratio_cr = c / r if c is not None else None

    print()
    print("=" * 78)
    print("REPRO scoring benchmark")
    print(machine_line(model))
    print(f"model: {getattr(model.config, '_name_or_path', '?')} | attn={model.config._attn_implementation} "
          f"| dtype={next(model.parameters()).dtype} | micro_batch_size={args.micro_batch_size}")
    print(f"rollouts: {source}")
    print("-" * 78)
    print(f"{'rollouts':<40}{len(batch):>10}")
    print(f"{'mean prompt tokens':<40}{float(prompt_len.mean()):>10.1f}")
    print(f"{'mean response tokens':<40}{float(resp_len.mean()):>10.1f}  (max {int(resp_len.max())})")
    print(f"{'mean line-break candidates':<40}{statistics.mean(n_candidates) if n_candidates else 0:>10.1f}")
    print(f"{'mean scored points (target k+2=' + str(target_points) + ')':<40}{statistics.mean(n_points):>10.1f}"
          f"  (min {min(n_points)}, max {max(n_points)}, total {sum(n_points)})")
    print("-" * 78)
    print(f"{'step':<40}{'median s':>10}   runs")
    fmt = lambda ts: ", ".join(f"{t:.2f}" for t in ts)  # noqa: E731
    print(f"{'(a) policy forward (no grad)':<40}{f:>10.3f}   [{fmt(t_fwd)}]")
    print(f"{'(b) REPRO ReproReward.__call__':<40}{r:>10.3f}   [{fmt(t_repro)}]")
    if c is not None:
        print(f"{'(c) reference: k+2 forwards / rollout':<40}{c:>10.3f}   [{fmt(t_ref)}]")
    else:
        print(f"{'(c) reference':<40}{'skipped':>10}")
    print("-" * 78)
    verdict = lambda ok: "PASS" if ok else "MISS"  # noqa: E731
    print(f"{'REPRO / forward   (target <= 1.5x)':<40}{ratio_rf:>9.2f}x   {verdict(ratio_rf <= 1.5)}")
    if ratio_cr is not None:
        print(f"{'reference / REPRO (target >= 5x)':<40}{ratio_cr:>9.2f}x   {verdict(ratio_cr >= 5.0)}")
        print(f"{'max |J_REPRO - J_reference|':<40}{max_diff:>10.2e}   "
              f"{'agree (<= 1e-4)' if max_diff <= 1e-4 else 'DISAGREE (> 1e-4)'}")
    print("=" * 78)
    if short:
        print(f"NOTE: {len(short)}/{len(batch)} rollouts have fewer than top_k={args.top_k} line-break "
              f"candidates, so they are scored at fewer than k+2={target_points} points "
              f"(actual points per rollout: {n_points}). Use --synthetic_lines 24 to exercise k={args.top_k}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
