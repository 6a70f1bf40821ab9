#!/usr/bin/env python
"""Which hidden-state layers should the LYNX probe read? Probes on subsets of one collection's layers.

    python train/lynx_probe.py ... --layers 5,10,15,20,25,30 --output_dir runs/lynx6
    python scripts/lynx_layer_sweep.py --probe runs/lynx6 --layer_sets "10,20,30;5;15;5,15,25"

A LYNX job stores each event's features as the concatenation of its ``--layers`` hidden states, so a
probe on any subset of them needs no new rollouts: the columns of those layers are selected. For each
subset the script trains the probe exactly as the job does (same probe-train events, labels and
:class:`probes.probe.ProbeTrainConfig`), calibrates it on the job's calibration events and reports

* AUC on the probe's validation split, the calibration events and the held-out events;
* per confidence c: the conformal threshold on continue scores, the share of safe calibration events
  that exit (the figure to choose by), and on held-out events the share of safe events that exit, the
  premature-exit rate P(exit | label 0) and how many held-out problems have an exit event;
* the decoding it implies, replayed on the collection's held-out rollouts (:func:`replay_exits`): each
  rollout exits at its first real cue event the rule accepts, costing the prefix, the exit string and
  the forced answer collected there (how the online decoder counts ``new_tokens``), and is right when
  that forced answer is; mean tokens against the rollouts' own, accuracy against theirs. The same
  replay with the labels as the rule (exit at the first safe cue) is the ceiling any probe could reach.

The subset equal to the job's layers reproduces the job's probe. Choose by the calibration columns and
keep the held-out ones as the check: choosing among many subsets on the calibration events themselves
weakens the conformal guarantee a little. Then run the job with the chosen ``--layers`` to export the
probe and measure decoding.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from train.cli import _OneLineParser, main_guard  # noqa: E402


class SweepError(ValueError):
    """A missing or unusable input; the message names what to fix."""


def parse_layer_sets(text: str) -> list[tuple[int, ...]]:
    """``"10,20,30;5;15"`` -> ``[(10, 20, 30), (5,), (15,)]``; one line naming the bad part otherwise."""
    sets = []
    for part in text.split(";"):
        part = part.strip()
        if not part:
            continue
        try:
            layers = tuple(int(x) for x in part.split(","))
        except ValueError:
            raise SweepError(f"--layer_sets: '{part}' is not a comma list of layer indices (e.g. \"10,20,30;5\")") from None
        if len(set(layers)) != len(layers):
            raise SweepError(f"--layer_sets: '{part}' names a layer twice")
        sets.append(layers)
    if not sets:
        raise SweepError("--layer_sets is empty; give subsets like \"10,20,30;5;15\"")
    return sets


def layer_columns(collected: tuple[int, ...], wanted: tuple[int, ...], hidden_size: int):
    """Feature columns of ``wanted`` layers in features concatenated over ``collected`` (in ``wanted`` order)."""
    import torch

    missing = [layer for layer in wanted if layer not in collected]
    if missing:
        raise SweepError(f"layer(s) {','.join(map(str, missing))} were not collected; this collection has "
                         f"{','.join(map(str, collected))} (rerun the LYNX job with those --layers)")
    return torch.cat([torch.arange(k * hidden_size, (k + 1) * hidden_size)
                      for k in (collected.index(layer) for layer in wanted)])


def replay_exits(problems, response_len: dict, rollout_correct: dict, events, exits, answer_len: dict,
                 exit_len: int) -> dict:
    """Mean tokens, accuracy and exit rate of ``problems`` when each rollout exits at its first
    non-synthetic event with ``exits`` True (events carry the forced-exit labels: 1 = its answer is right).

    tokens = event index (the prefix before the cue token) + ``exit_len`` + the forced answer's tokens;
    without an exit the rollout's own length and correctness.
    """
    tokens, right, exited = [], [], []
    for p in problems:
        rows = [k for k in range(len(events)) if int(events.problem[k]) == p and bool(exits[k])
                and not bool(events.synthetic[k])]
        if rows:
            k = min(rows, key=lambda r: int(events.event_index[r]))
            i = int(events.event_index[k])
            tokens.append(i + exit_len + answer_len[(p, i)])
            right.append(bool(events.labels[k]))
            exited.append(True)
        else:
            tokens.append(response_len[p])
            right.append(bool(rollout_correct[p]))
            exited.append(False)
    n = max(len(tokens), 1)
    return {"mean_tokens": sum(tokens) / n, "accuracy": sum(right) / n, "exit_rate": sum(exited) / n}


def parse_args(argv=None) -> argparse.Namespace:
    p = _OneLineParser(prog="lynx_layer_sweep.py", description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--probe", required=True, help="the LYNX job's --output_dir (its summary.json names the events)")
    p.add_argument("--layer_sets", required=True, help="subsets of the collected layers, ';' between subsets, e.g. \"10,20,30;5;15\"")
    p.add_argument("--confidence", default=None, help="comma list of c; default: the job's confidences")
    return p.parse_args(argv)


def sweep(args) -> dict:
    """Per layer subset: AUCs, exit rates and the replayed decoding (module docstring)."""
    import torch

    from algos.models import load_tokenizer
    from probes.collect import EventShards, split_problems
    from probes.conformal import ConformalCalibration
    from probes.pipeline import LynxJobConfig, load_problems
    from probes.probe import ProbeTrainConfig, roc_auc, train_probe

    layer_sets = parse_layer_sets(args.layer_sets)
    summary_path = Path(args.probe) / "summary.json"
    if not summary_path.is_file():
        raise SweepError(f"no summary.json in '{args.probe}': give the --output_dir of a train/lynx_probe.py run")
    summary = json.loads(summary_path.read_text())
    job = LynxJobConfig(**{**summary["job"], "probe": ProbeTrainConfig(**summary["job"]["probe"])})
    shards = EventShards(summary["events_dir"])
    collected = tuple(shards.settings["layers"])
    hidden_size = int(shards.settings["feature_dim"]) // len(collected)
    columns = [layer_columns(collected, layers, hidden_size) for layers in layer_sets]  # every set checked first
    pool, held = load_problems(job)
    train_idx, calib_idx = split_problems(len(pool), job.calibration_fraction, job.seed)
    test_idx = list(range(len(pool), len(pool) + len(held)))
    tokenizer = load_tokenizer(job.model_name_or_path)
    correct = shards.rollout_correct(tokenizer, pool + held)
    train = shards.load(train_idx, job.max_events_per_rollout).relabelled(job.exit_label, correct)
    calib = shards.load(calib_idx, job.max_calibration_events_per_rollout).relabelled(job.exit_label, correct)
    test_forced = shards.load(test_idx, job.max_calibration_events_per_rollout)
    test = test_forced.relabelled(job.exit_label, correct)
    rollouts = shards.rollouts()
    response_len = dict(zip(rollouts["problem"].tolist(), rollouts["response_len"].tolist()))
    answer_len = shards.answer_lengths()
    exit_len = len(tokenizer(shards.settings["exit_string"], add_special_tokens=False)["input_ids"])

    def replay(exits):
        return replay_exits(test_idx, response_len, correct, test_forced, exits, answer_len, exit_len)
    confidences = ([float(c) for c in args.confidence.split(",") if c.strip()] if args.confidence
                   else sorted({job.confidence, *job.eval_confidences}))

    def rate(mask):
        return float(mask.float().mean()) if mask.numel() else math.nan

    rows = []
    for layers, cols in zip(layer_sets, columns):
        probe, metrics = train_probe(train.features[:, cols], train.labels, job.probe)
        p_cal, p_test = probe.predict_proba(calib.features[:, cols]), probe.predict_proba(test.features[:, cols])
        calibration = ConformalCalibration.from_probs(p_cal, calib.labels)
        row = {"layers": list(layers), "val_auc": metrics["val_auc"], "calibration_auc": roc_auc(p_cal, calib.labels),
               "held_out_auc": roc_auc(p_test, test.labels) if len(test) else math.nan, "rules": []}
        for c in confidences:
            rule = calibration.rule(confidence=c)
            exit_cal, exit_test = rule.should_exit(p_cal), rule.should_exit(p_test)
            safe_cal, safe_test = calib.labels.bool(), test.labels.bool()
            row["rules"].append({
                "confidence": c, "q_continue": rule.q_continue,
                "calibration_safe_exit_rate": rate(exit_cal[safe_cal]),
                "held_out_safe_exit_rate": rate(exit_test[safe_test]),
                "held_out_premature_exit_rate": rate(exit_test[~safe_test]),
                "held_out_continue_events": int((~safe_test).sum()),
                "held_out_problems_exiting": len(set(test.problem[exit_test].tolist())),
                "replay": replay(exit_test)})
        rows.append(row)
    no_exit = replay(torch.zeros(len(test), dtype=torch.bool))
    return {"collected_layers": list(collected), "exit_label": job.exit_label, "events": {
        "train": len(train), "calibration": len(calib), "held_out": len(test)},
        "held_out_problems": len(held), "no_exit": no_exit, "ceiling": replay(test.labels.bool()), "rows": rows}


def _change(arm: dict, base: dict) -> str:
    return f"{arm['mean_tokens'] / base['mean_tokens'] - 1:+.1%}" if base["mean_tokens"] else "n/a"


def report(result: dict) -> str:
    e = result["events"]
    lines = [f"collected layers {','.join(map(str, result['collected_layers']))}; {result['exit_label']} labels; events: "
             f"probe-train {e['train']}, calibration {e['calibration']}, held-out {e['held_out']} "
             f"({result['held_out_problems']} problems)",
             "per confidence: q_continue, safe events exiting (calibration / held-out), premature-exit rate on "
             "held-out events (continue events), held-out problems with an exit, and the held-out rollouts replayed "
             "with those exits: token change, accuracy"]
    base, ceiling = result["no_exit"], result["ceiling"]
    lines.append(f"held-out rollouts without exits: {base['mean_tokens']:.1f} tokens, accuracy {base['accuracy']:.3f}; "
                 f"exiting at the first safe cue (the ceiling): {ceiling['mean_tokens']:.1f} tokens "
                 f"({_change(ceiling, base)}), accuracy {ceiling['accuracy']:.3f}")
    for r in result["rows"]:
        head = (f"layers {','.join(map(str, r['layers'])):<18} AUC val {r['val_auc']:.3f} calibration "
                f"{r['calibration_auc']:.3f} held-out {r['held_out_auc']:.3f}")
        rules = [f"c={q['confidence']}: q {q['q_continue']:.3f}, safe {q['calibration_safe_exit_rate']:.2f} / "
                 f"{q['held_out_safe_exit_rate']:.2f}, premature {q['held_out_premature_exit_rate']:.3f} "
                 f"({q['held_out_continue_events']}), {q['held_out_problems_exiting']} problems, replay "
                 f"{_change(q['replay'], base)} tokens, accuracy {q['replay']['accuracy']:.3f}" for q in r["rules"]]
        lines.append(head + " | " + " | ".join(rules))
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)

    from probes.collect import CollectError

    def run():
        result = sweep(args)
        print(report(result))
        return result

    return main_guard(run, errors=(SweepError, CollectError))


if __name__ == "__main__":
    main()
