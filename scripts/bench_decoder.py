#!/usr/bin/env python
"""What composing the decoders costs: EfficientDecoder's paths with every part neutral vs HF generate.

On one batch of GSM8K prompts (default 4, at most 64 new tokens) this times, in the same run and
in alternating order (median of ``--repeats``), each path with settings that leave the tokens
unchanged, so every run decodes the same number of steps:

  greedy   (a) HF ``generate``            (b) ``EfficientDecoder.generate`` with everything off
           (c) routing on a dense path     (RoutedCausalLM: per-path cache, HF-style forward)
           (d) early exit, a probe that never exits and a cue that never occurs (cue detection)
           (e) routing + early exit
  sampled  (f) HF ``generate``, T = 0.7   (g) branching with theta = inf and M = 1 (EAGER's loop)
           (h) branching + routing + early exit, all neutral

Greedy runs (b)-(e) must give exactly (a)'s tokens and (g)/(h) exactly (f)'s for the same seed;
the script checks it. Reported: ms per generated token (wall) and the ratio to the HF run.
The exit code is 0 whatever the figures.

Example:  OMP_NUM_THREADS=1 python scripts/bench_decoder.py --threads 1
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from algos.data import build_prompt, load_records  # noqa: E402
from algos.device import add_device_arguments, resolve_device_dtype  # noqa: E402
from algos.models import load_causal_lm, load_tokenizer, model_identity  # noqa: E402
from deploy.decoder import EfficientDecoder  # noqa: E402
from probes.conformal import ConformalCalibration  # noqa: E402
from probes.cues import CueConfig  # noqa: E402
from probes.early_exit import default_layers  # noqa: E402
from probes.export import LynxProbe  # noqa: E402
from probes.probe import ExitProbe  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Time EfficientDecoder's paths (parts neutral) against HF generate.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model_name_or_path", default=None, help="HF id or path; default: embedded SmolLM2-135M-Instruct")
    p.add_argument("--batch_size", type=int, default=4, help="GSM8K prompts in the batch")
    p.add_argument("--max_new_tokens", type=int, default=64, help="most tokens generated per row")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats of each run; median reported")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: $REPRO_RL_NUM_THREADS, else torch's)")
    add_device_arguments(p)
    args = p.parse_args(argv)
    if min(args.batch_size, args.max_new_tokens, args.repeats) < 1:
        p.error("--batch_size, --max_new_tokens and --repeats must be >= 1")
    return args


class DenseRouter:
    """A router that executes every block (what a neutral Dr.LLM path is)."""

    def decider(self, p=None):
        return lambda layer, hidden, mask: torch.ones(hidden.shape[0], dtype=torch.long)


def never_exit_probe(model) -> LynxProbe:
    """A probe on the default layers whose cue never occurs and whose rule never exits."""
    layers = default_layers(model.config.num_hidden_layers)
    probe = ExitProbe(len(layers) * model.config.hidden_size, (16,)).eval()
    return LynxProbe(probe=probe, calibration=ConformalCalibration([], []), layers=layers,
                     cue_config=CueConfig(("\u2603\u2603",), word_boundary=False, region_end=()),
                     exit_string="\nFinal Answer: \\boxed{", base_model=model_identity(model))


def main(argv=None) -> int:
    args = parse_args(argv)
    threads = args.threads or int(os.environ.get("REPRO_RL_NUM_THREADS") or 0)
    if threads:
        torch.set_num_threads(threads)
    tokenizer = load_tokenizer(args.model_name_or_path)
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    model = load_causal_lm(args.model_name_or_path, dtype=dtype).to(device).eval()
    decoder = EfficientDecoder(model, tokenizer, probe=never_exit_probe(model), router=DenseRouter())
    prompts = [build_prompt(tokenizer, r["question"]) for r in load_records("gsm8k", n=args.batch_size)]
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False).to(device)
    n = args.max_new_tokens

    def hf(sample: bool):
        def run():
            torch.manual_seed(0)
            extra = dict(do_sample=True, temperature=0.7, top_k=0, top_p=1.0) if sample else dict(do_sample=False)
            out = model.generate(**enc, max_new_tokens=n, pad_token_id=tokenizer.pad_token_id, **extra)
            rows = out[:, enc["input_ids"].shape[1]:].tolist()
            return [[t for t in r if t != tokenizer.pad_token_id] for r in rows]
        return run

    def ours(**parts):
        sample = parts.pop("sample", False)
        extra = dict(do_sample=True, temperature=0.7, branch_threshold=float("inf"), max_branches=1) if sample else {}
        return lambda: [[t for t in s.token_ids if t != tokenizer.pad_token_id]
                        for s in decoder.generate(prompts, max_new_tokens=n, seed=0, confidence=0.9, **parts,
                                                  **extra).sequences]

    runs = {
        "(a) HF generate, greedy": hf(False),
        "(b) decoder, everything off": ours(),
        "(c) routing (dense path)": ours(routing=True),
        "(d) early exit (never fires)": ours(early_exit=True),
        "(e) routing + early exit": ours(routing=True, early_exit=True),
        "(f) HF generate, sampled": hf(True),
        "(g) branching (theta = inf, M = 1)": ours(branching=True, sample=True),
        "(h) branching + routing + early exit": ours(branching=True, routing=True, early_exit=True, sample=True),
    }
    times = {name: [] for name in runs}
    outputs = {}
    for _ in range(args.repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            outputs[name] = run()
            times[name].append(time.perf_counter() - start)
    ok_greedy = all(outputs[k] == outputs["(a) HF generate, greedy"] for k in list(runs)[1:5])
    ok_sampled = all(outputs[k] == outputs["(f) HF generate, sampled"] for k in list(runs)[6:])
    print(f"model {model_identity(model)['name']}, {args.batch_size} prompts, <= {n} new tokens, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"same tokens as HF: greedy {ok_greedy}, sampled {ok_sampled}")
    for name in runs:
        tokens = sum(len(r) for r in outputs[name])
        base = "(a) HF generate, greedy" if list(runs).index(name) < 5 else "(f) HF generate, sampled"
        med, ref = statistics.median(times[name]), statistics.median(times[base])
        print(f"  {name:40s} {1000 * med / tokens:7.2f} ms/token  {med / ref:5.2f}x  ({tokens} tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
