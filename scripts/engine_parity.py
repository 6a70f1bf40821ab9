"""Do our sampler and the colocated vLLM engine sample the same policy? Same weights, same prompts.

Builds the trainer of a training config with ``--use_vllm`` (so vLLM starts exactly as in training:
same dtype, seed and sampling settings), then samples the same training prompts with both engines,
``--num_generations`` completions each, ``--repeats`` times, and prints per engine, with standard
errors over prompts:

- the config's rewards (each component and the total) and the fraction of groups whose rewards vary
  (what GRPO and dynamic sampling learn from);
- completion length, stop rate (EOS before the limit) and distinct completions per group;
- the mean behaviour log-prob the engine reported for its own tokens, and the trainer's log-prob of the
  same tokens (``RLTrainer.forward``; the mean |difference| is the engine mismatch);
- greedy held-out accuracy (the trainer's evaluation) through each engine, and how many held-out
  completions the two engines write identically.

    python scripts/engine_parity.py --config configs/quickstart_grpo.yaml --threads 2
    python scripts/engine_parity.py --config configs/quickstart_grpo.yaml --model runs/quickstart_grpo/checkpoint-25

Differences well inside the standard errors mean the engines are interchangeable at these weights;
what the two kinds of training runs then do differently is the trajectory, not the sampler.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="a training YAML (its task, rewards, sampling and dtype)")
    p.add_argument("--model", default=None, help="weights to compare at (a checkpoint directory); default: the config's")
    p.add_argument("--num_prompts", type=int, default=64, help="training prompts sampled by both engines")
    p.add_argument("--repeats", type=int, default=1, help="rollouts of the prompts per engine")
    p.add_argument("--num_eval_samples", type=int, default=100, help="held-out problems for greedy accuracy (0: skip)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--output_json", default=None, help="also write the figures here")
    args = p.parse_args(argv)
    if args.num_prompts < 2 or args.repeats < 1 or args.num_eval_samples < 0:
        p.error("--num_prompts must be >= 2, --repeats >= 1 and --num_eval_samples >= 0")
    return args


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error (sample std / sqrt(n))."""
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var / n)


def group_stats(trainer, batch, rewards) -> dict[str, list[float]]:
    """Per prompt (group): reward components and total, varying rewards, length, stops, distinct
    completions, engine and trainer log-probs of the sampled tokens."""
    import torch

    with torch.no_grad(), trainer.accelerator.autocast():
        trainer_logp, _, _ = trainer.forward(trainer.model, batch)
    mask = batch.response_mask.float()
    out: dict[str, list[float]] = {}

    def add(key, value):
        out.setdefault(key, []).append(float(value))

    for g in batch.group_ids.unique().tolist():
        rows = (batch.group_ids == g).nonzero().flatten()
        for name, values in rewards.components.items():
            add(f"reward/{name}", values[rows].float().mean())
        total = rewards.total[rows]
        add("reward/total", total.mean())
        add("groups with varying rewards", float(bool((total != total[0]).any())))
        m = mask[rows]
        add("length (tokens)", m.sum(1).mean())
        add("stop rate", sum(batch.finish_reasons[r] == "stop" for r in rows.tolist()) / len(rows))
        add("distinct completions", len({batch.completions[r] for r in rows.tolist()}))
        add("engine log-prob / token", (batch.logprobs[rows] * m).sum() / m.sum().clamp(min=1))
        add("trainer log-prob / token", (trainer_logp[rows] * m).sum() / m.sum().clamp(min=1))
        add("|engine - trainer| / token", ((batch.logprobs[rows] - trainer_logp[rows]).abs() * m).sum()
            / m.sum().clamp(min=1))
    return out


def main(argv=None):
    from train.cli import main_guard

    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="engine-parity-") as out_dir:  # the trainer's outputs, not kept
        return main_guard(lambda: compare(args, out_dir))


def compare(args, out_dir: str) -> dict:
    import torch

    if args.threads:
        os.environ["REPRO_RL_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    from algos.evaluation import evaluate_accuracy
    from algos.rollout.hf import HFGenerateEngine
    from algos.trainer import RLTrainer
    from train.cli import parse_config

    argv = ["--config", args.config, "--use_vllm", "true", "--output_dir", out_dir, "--report_to", "none",
            "--num_eval_samples", str(args.num_eval_samples), "--seed", str(args.seed)]
    if args.model:
        argv += ["--model_name_or_path", args.model]
    trainer = RLTrainer(parse_config(argv, prog="engine_parity"))
    engines = {"ours": HFGenerateEngine(trainer.tokenizer, trainer.engine.params), "vllm": trainer.engine}
    prompts, extras = trainer.prompt_batch(list(range(min(args.num_prompts, len(trainer.train_records)))))

    c = trainer.config
    stats: dict[str, dict[str, list[float]]] = {}
    for name, engine in engines.items():
        trainer.engine = engine
        for _ in range(args.repeats):
            batch = trainer.rollout(prompts, extras)
            for k, v in group_stats(trainer, batch, trainer.score(batch)).items():
                stats.setdefault(name, {}).setdefault(k, []).extend(v)
        print(f"[parity] {name}: {len(prompts)} prompts x {trainer.config.num_generations} x {args.repeats} sampled",
              flush=True)

    evals = {}  # greedy held-out accuracy, as the trainer evaluates
    with trainer.accelerator.autocast():
        for name, engine in engines.items() if args.num_eval_samples else ():
            evals[name] = evaluate_accuracy(trainer.policy, engine, trainer.eval_records, trainer.prompt_text,
                                            batch_size=c.eval_batch_size)

    print(f"\n== engine parity: {c.model_name_or_path or 'default model'}, {c.dataset}, T = {c.temperature}, "
          f"<= {c.max_completion_length} tokens, {'bf16' if c.bf16 else 'fp32'} trainer, vLLM {engines['vllm'].settings.dtype} ==")
    print(f"{'':32} {'ours':>18} {'vllm':>18} {'diff / se':>10}")
    report = {"model": c.model_name_or_path, "prompts": len(prompts), "repeats": args.repeats, "stats": {}}
    for key in stats["ours"]:
        (a, sa), (b, sb) = mean_se(stats["ours"][key]), mean_se(stats["vllm"][key])
        se = math.sqrt(sa ** 2 + sb ** 2)
        z = (b - a) / se if se > 0 else 0.0
        report["stats"][key] = {"ours": [a, sa], "vllm": [b, sb], "z": z}
        print(f"{key:32} {a:10.4f} ± {sa:.4f} {b:10.4f} ± {sb:.4f} {z:+10.2f}")
    if evals:
        acc = {k: v["accuracy"] for k, v in evals.items()}
        same = sum(a == b for a, b in zip(evals["ours"]["completions"], evals["vllm"]["completions"]))
        n = evals["ours"]["n"]
        print(f"{'held-out greedy accuracy':32} {acc['ours']:18.4f} {acc['vllm']:18.4f}   "
              f"(n = {n}; {same} completions identical)")
        report["held_out"] = {"n": n, "accuracy": acc, "identical_completions": same}
    if args.output_json:
        import json

        with open(args.output_json, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
