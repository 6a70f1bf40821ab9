#!/usr/bin/env python
"""LYNX premature-exit rate with features from the decoding setting (another dtype, Dr.LLM routing).

    python scripts/lynx_feature_shift.py --probe runs/lynx --dtype bfloat16 --router runs/drllm

Split conformal bounds P(exit | exiting is wrong) <= delta = 1 - c for features like the
calibration's. The decoder warns when it shifts them; this measures the effect. On the held-out
events of the probe's LYNX job (found through ``<probe>/summary.json``: its problems, prompt template
and event directory) the premature-exit rate is computed twice, with the same events and labels:
with the features the job collected, and with features recomputed by the model in ``--dtype``,
routed by ``--router`` when given (:func:`probes.evaluate.recompute_features`). Labels stay the
collection's (forced exits of the unshifted model), so the difference is the feature shift alone.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from algos.device import add_device_arguments  # noqa: E402
from train.cli import _OneLineParser, main_guard  # noqa: E402


class ShiftError(ValueError):
    """A missing or unusable input; the message names what to fix."""


def parse_args(argv=None) -> argparse.Namespace:
    p = _OneLineParser(prog="lynx_feature_shift.py", description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--probe", required=True, help="the LYNX job's --output_dir (probe export + summary.json)")
    p.add_argument("--model", default=None, help="model path or hub id; default: the job's model")
    p.add_argument("--router", default=None, help="Dr.LLM router export (or its job's output_dir): recompute the "
                   "features along the router's path")
    p.add_argument("--routing_p", type=float, default=None, help="router knob in [-1, 1]; default: the export's")
    p.add_argument("--confidence", default=None, help="comma list of c; default: the job's confidences")
    add_device_arguments(p)
    return p.parse_args(argv)


def measure(args) -> dict:
    """Premature-exit rates with the stored and the recomputed features; see the module docstring."""
    from algos.data import build_prompt
    from algos.device import dtype_name, resolve_device_dtype
    from algos.models import load_causal_lm, load_tokenizer
    from probes.collect import EventShards
    from probes.evaluate import premature_exit_rates, recompute_features
    from probes.export import load_probe
    from probes.pipeline import LynxJobConfig, load_problems
    from probes.probe import ProbeTrainConfig

    summary_path = Path(args.probe) / "summary.json"
    if not summary_path.is_file():
        raise ShiftError(f"no summary.json in '{args.probe}': give the --output_dir of a train/lynx_probe.py run")
    summary = json.loads(summary_path.read_text())
    job = LynxJobConfig(**{**summary["job"], "probe": ProbeTrainConfig(**summary["job"]["probe"])})
    pool, held = load_problems(job)
    if not held:
        raise ShiftError(f"the LYNX job in '{args.probe}' has no held-out problems; rerun it with --num_eval_problems > 0")
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    model_path = args.model or job.model_name_or_path
    tokenizer = load_tokenizer(model_path)
    model = load_causal_lm(model_path, dtype=dtype).to(device).eval()
    probe = load_probe(args.probe, model, check_name=False)  # the weights are checked by fingerprint
    shards = EventShards(summary["events_dir"])
    problems = range(len(pool), len(pool) + len(held))
    events = shards.load(problems, job.max_calibration_events_per_rollout)  # the job's held-out events
    if job.exit_label != "forced":  # the labels the probe was calibrated with
        events = events.relabelled(job.exit_label, shards.rollout_correct(tokenizer, pool + held))
    if not len(events):
        raise ShiftError(f"no held-out events in '{summary['events_dir']}'")
    forward = model
    if args.router:
        from routers.export import META_FILE, load_router
        from routers.routed_lm import RoutedCausalLM

        where = Path(args.router)
        where = where / "router" if not (where / META_FILE).is_file() and (where / "router" / META_FILE).is_file() else where
        router, meta = load_router(where, model, device=device)  # a router job's output_dir holds it in router/
        p = meta.get("p_default") if args.routing_p is None else args.routing_p
        forward = RoutedCausalLM(model, decide=router.decider(p))
    prompts = {i: build_prompt(tokenizer, r["question"], job.prompt_template) for i, r in zip(problems, held)}
    shifted = replace(events, features=recompute_features(forward, tokenizer, events, prompts, shards.responses(),
                                                          probe.layers))
    confidences = ([float(c) for c in args.confidence.split(",") if c.strip()] if args.confidence
                   else sorted({job.confidence, *job.eval_confidences}))
    change = (probe.score(shifted.features) - probe.score(events.features)).abs()
    setting = {"dtype": dtype_name(dtype), "routing": bool(args.router)}
    return {"calibrated_with": probe.calibrated_with, "setting": setting, "events": len(events),
            "score_change_mean": float(change.mean()), "score_change_max": float(change.max()),
            "stored": premature_exit_rates(probe, events, confidences),
            "shifted": premature_exit_rates(probe, shifted, confidences)}


def _describe(setting: dict) -> str:
    if not setting:
        return "an unrecorded setting"
    return f"{setting.get('dtype', 'an unrecorded dtype')} {'with' if setting.get('routing') else 'without'} routing"


def report(result: dict) -> str:
    lines = [f"{result['events']} held-out events; probe calibrated in {_describe(result['calibrated_with'])}, "
             f"features now from {_describe(result['setting'])}",
             f"probe score change |p_now - p_stored|: mean {result['score_change_mean']:.4f}, "
             f"max {result['score_change_max']:.4f}",
             "P(exit | exiting is wrong) with the stored features and with features from the setting now:",
             f"{'c':>6} {'delta':>6} {'stored':>8} {'now':>8}   safe events exiting (stored / now)"]
    for a, b in zip(result["stored"], result["shifted"]):
        lines.append(f"{a['confidence']:>6} {a['delta']:>6.3f} {a['premature_exit_rate']:>8.3f} "
                     f"{b['premature_exit_rate']:>8.3f}   {a['safe_exit_rate']:.3f} / {b['safe_exit_rate']:.3f}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)

    from probes.collect import CollectError
    from probes.export import ProbeLoadError

    def run():
        result = measure(args)
        print(report(result))
        return result

    return main_guard(run, errors=(ShiftError, CollectError, ProbeLoadError, ValueError))


if __name__ == "__main__":
    main()
