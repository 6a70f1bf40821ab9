#!/usr/bin/env python
"""Per-token overhead of the online LYNX decoder against plain HF ``generate``.

On one batch of GSM8K prompts (default: 4 prompts, at most 256 new tokens, greedy; every run
produces the same tokens, so the same number of decoding steps) this times, in the same run:

  (a) plain     ``model.generate`` (greedy);
  (b) no cue    ``lynx_generate`` with a probe attached whose cue never occurs: the per-token
                detokenizer + cue detector run, the probe never does (target <= 5% over (a));
  (c) cues      the same with a cue string chosen from the plain output so that it fires about
                every ``--cue_every`` tokens per row (the actual rate is printed): at each event the
                step returns hidden states and the probe (a random MLP on the default layers) is scored.

The probe's rule never exits (both conformal thresholds are +inf), so (b) and (c) must produce
exactly the tokens of (a); the script checks it. Each is run ``--repeats`` times in alternating
order and the median is reported, as milliseconds per decoding step (batch rows x steps, prefill
included) and as ratios to (a), both in wall time and in this process's CPU time (on a shared
machine the CPU time is the steadier measure of the work done). The exit code is 0 whatever the
figures.

Example:  OMP_NUM_THREADS=1 python scripts/bench_lynx.py --threads 1
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from algos.data import build_prompt, load_records  # noqa: E402
from algos.device import add_device_arguments, resolve_device_dtype  # noqa: E402
from algos.models import load_causal_lm, load_tokenizer  # noqa: E402
from probes.conformal import ExitRule  # noqa: E402
from probes.cues import CueConfig, IncrementalDetokenizer, cue_events_from_texts  # noqa: E402
from probes.early_exit import ProbeExitPolicy, default_layers, lynx_generate  # noqa: E402
from probes.probe import ExitProbe  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Time the online LYNX decoder against plain generate.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model_name_or_path", default=None, help="HF id or path; default: embedded SmolLM2-135M-Instruct")
    p.add_argument("--batch_size", type=int, default=4, help="GSM8K prompts in the batch")
    p.add_argument("--max_new_tokens", type=int, default=256, help="most tokens generated per row")
    p.add_argument("--cue_every", type=int, default=50, help="target tokens between cue events in run (c)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats of each run; median reported")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: $REPRO_RL_NUM_THREADS, else torch's)")
    add_device_arguments(p)
    args = p.parse_args(argv)
    if min(args.batch_size, args.max_new_tokens, args.cue_every, args.repeats) < 1:
        p.error("--batch_size, --max_new_tokens, --cue_every and --repeats must be >= 1")
    return args


def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.lower().startswith("model name")), cpu)
    except OSError:
        pass
    load = f" | loadavg(1m) {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else ""
    return f"CPU: {cpu} ({os.cpu_count()} logical cores) | torch {torch.__version__}, {torch.get_num_threads()} threads{load}"


def pick_cue(tokenizer, responses, every: int) -> tuple[CueConfig, float]:
    """The token text (of the plain responses) whose matches come closest to one per ``every`` tokens."""
    texts = []
    for r in responses:
        detok = IncrementalDetokenizer(tokenizer)
        texts.append([detok.push(t) for t in r])
    candidates = {t.strip() for row in texts for t in row if t.strip() and len(t.strip()) <= 12}
    target = len(responses[0]) / every
    best, best_rate = None, None
    for cand in sorted(candidates):
        cfg = CueConfig((cand,), word_boundary=False, region_end=())
        rate = statistics.mean(len(cue_events_from_texts(row, cfg)) for row in texts)
        if best is None or abs(rate - target) < abs(best_rate - target):
            best, best_rate = cfg, rate
    return best, best_rate


def main(argv=None):
    args = parse_args(argv)
    threads = args.threads or int(os.environ.get("REPRO_RL_NUM_THREADS") or 0)
    if threads:
        torch.set_num_threads(threads)
    tokenizer = load_tokenizer(args.model_name_or_path)
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    model = load_causal_lm(args.model_name_or_path, dtype=dtype).to(device).eval()
    records = load_records("gsm8k", n=args.batch_size)
    enc = tokenizer([build_prompt(tokenizer, r["question"]) for r in records], return_tensors="pt", padding=True,
                    add_special_tokens=False, padding_side="left")
    ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    n_new = args.max_new_tokens
    gen_config = copy.deepcopy(model.generation_config)
    gen_config.update(do_sample=False, temperature=None, top_p=None, top_k=None, max_new_tokens=n_new,
                      pad_token_id=tokenizer.pad_token_id)
    eos = gen_config.eos_token_id
    layers = default_layers(model.config.num_hidden_layers)
    torch.manual_seed(0)
    probe = ExitProbe(len(layers) * model.config.hidden_size).to(device).eval()
    policy = ProbeExitPolicy(probe, ExitRule(0.05, float("inf"), float("inf")), layers)  # scores, never exits

    def plain():
        return model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_config)

    def lynx(cues):
        def run():
            return lynx_generate(model, tokenizer, ids, mask, policy=policy, cue_config=cues,
                                 exit_string="\nFinal Answer: \\boxed{", max_new_tokens=n_new, eos_token_id=eos)
        return run

    with torch.no_grad():
        reference = plain()
    width = ids.shape[1]
    steps = reference.shape[1] - width
    stop = {tokenizer.pad_token_id, *(eos if isinstance(eos, list) else [eos])}
    responses = [[t for t in r if t not in stop] for r in reference[:, width:].tolist()]
    never = CueConfig(("\x00no-such-cue\x00",), word_boundary=False, region_end=())
    often, rate = pick_cue(tokenizer, responses, args.cue_every)
    runs = {"plain generate": plain, "lynx, no cue": lynx(never), "lynx, cues": lynx(often)}

    print(machine_line())
    mean_len = statistics.mean(map(len, responses))
    print(f"model {model.config._name_or_path}, batch {args.batch_size}, prompt width {width}, {steps} decoding steps "
          f"(responses {mean_len:.0f} tokens on average, at most {n_new}), greedy, {args.repeats} repeats (median); "
          f"probe layers {list(layers)}")
    print(f"cue for run (c): {often.cues[0]!r}, {rate:.1f} events per row = one per {mean_len / max(rate, 1e-9):.0f} tokens")
    times: dict[str, list[float]] = {k: [] for k in runs}
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    outputs = {}
    for rep in range(args.repeats):
        order = list(runs) if rep % 2 == 0 else list(runs)[::-1]
        for name in order:
            with torch.no_grad():
                t0, c0 = time.perf_counter(), time.process_time()
                out = runs[name]()
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
            outputs[name] = out if isinstance(out, torch.Tensor) else out.sequences
            if name == "lynx, cues" and rep == 0:
                events = sum(s.num_events for s in out.stats)
                print(f"run (c) scored {events} events ({events / args.batch_size:.1f} per row)")
    tokens = args.batch_size * steps
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    base, base_cpu = med["plain generate"], med_cpu["plain generate"]
    print(f"\n{'run':<16} {'wall s':>8} {'ms/token':>9} {'vs plain':>9} {'CPU s':>8} {'ms/token':>9} {'vs plain':>9}"
          "  identical tokens")
    for name in runs:
        same = torch.equal(outputs[name], reference)
        print(f"{name:<16} {med[name]:>8.2f} {1000 * med[name] / tokens:>9.2f} {med[name] / base - 1:>+9.1%} "
              f"{med_cpu[name]:>8.2f} {1000 * med_cpu[name] / tokens:>9.2f} {med_cpu[name] / base_cpu - 1:>+9.1%}"
              f"  {'yes' if same else 'NO'}")
    for label, m, b in (("wall", med, base), ("CPU", med_cpu, base_cpu)):
        overhead = m["lynx, no cue"] / b - 1
        print(f"{label:>4}: no-cue overhead {overhead:+.1%} (target <= +5%: {'PASS' if overhead <= 0.05 else 'MISS'}); "
              f"cues every ~{args.cue_every} tokens {m['lynx, cues'] / b - 1:+.1%}")


if __name__ == "__main__":
    main()
