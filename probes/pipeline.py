"""The LYNX probe job: collect -> train -> calibrate -> export (-> held-out evaluation).

1. **collect** (:mod:`probes.collect`): one sampled rollout per problem, cue events, features and
   forced-exit labels, resumable in ``data_dir``. The problems are the training pool (GSM8K /
   an HF or local dataset: its first ``num_problems`` records; arithmetic: distinct problems of its
   train split) plus the held-out problems (the last ``num_eval_problems`` records; arithmetic: its
   test split), whose events only serve the held-out checks.
2. **train** (:mod:`probes.probe`): the pool is split by problem (:func:`probes.collect.split_problems`)
   into probe-train and calibration; the MLP trains on the probe-train events (at most 200 per
   rollout, reference).
3. **calibrate** (:mod:`probes.conformal`): class-conditional split conformal scores of the
   calibration events (at most 100 per rollout, reference), problems disjoint from training.
4. **export** (:mod:`probes.export`): ``output_dir`` = safetensors + JSON with the calibration scores.
5. **evaluate** (:mod:`probes.evaluate`, when ``num_eval_problems > 0``): premature-exit rate vs
   delta on held-out events, and decoding (greedy, or sampled with --eval_temperature) with and without exits at
   ``eval_confidences``.

Everything measured goes to ``output_dir/summary.json`` and is printed at the end.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from algos.data import SYNTHETIC_TASKS, ArithmeticTask, DataConfigError, load_records
from algos.device import dtype_name, resolve_device_dtype
from algos.fingerprint import base_identity
from algos.models import load_causal_lm, load_tokenizer
from probes.collect import (EXIT_LABELS, LYNX_PROMPT_TEMPLATE, CollectConfig, EventSet, collect_events, split_problems,
                            write_json_atomic)
from probes.conformal import ConformalCalibration
from probes.cues import ANSWER_START, THINK_END, CueConfig, cue_preset, default_exit_string, has_thinking_block
from probes.early_exit import default_layers
from probes.evaluate import evaluate_decoding, premature_exit_rates
from probes.export import LynxProbe, save_probe
from probes.probe import ProbeTrainConfig, roc_auc, train_probe


class LynxJobError(ValueError):
    """A setting or an outcome the user must fix (one line naming it)."""


# Rollout budget when --max_new_tokens is not given: a thinking model's cues and its answer come after
# hundreds to thousands of thinking tokens (the users think for 8k-32k), so 512 would cut most
# rollouts before any answer; 4096 is the budget at which a laptop run is still feasible.
PLAIN_COLLECT_TOKENS, THINKING_COLLECT_TOKENS = 512, 4096


def default_max_new_tokens(tokenizer) -> int:
    """512, or 4096 for a model with a thinking block (``</think>``)."""
    return THINKING_COLLECT_TOKENS if has_thinking_block(tokenizer) else PLAIN_COLLECT_TOKENS


@dataclass
class LynxJobConfig:
    model_name_or_path: str | None = None
    dataset: str = "gsm8k"
    question_column: str = "question"
    answer_column: str = "answer"
    arithmetic_digits: int = 2
    arithmetic_operands: int = 2
    arithmetic_operators: str = "+"
    num_problems: int = 200
    calibration_fraction: float = 0.5
    num_eval_problems: int = 50
    output_dir: str = "runs/lynx"
    data_dir: str | None = None  # default: <output_dir>-events
    confidence: float = 0.95
    eval_confidences: tuple[float, ...] = (0.9, 0.97)
    cue_preset: str = "auto"  # words for thinking models, linebreak otherwise
    cues: tuple[str, ...] | None = None
    exit_string: str | None = None
    layers: tuple[int, ...] | None = None
    prompt_template: str = LYNX_PROMPT_TEMPLATE
    batch_size: int = 8
    max_new_tokens: int | None = None  # None: 512, or 4096 for a thinking model (</think>)
    temperature: float = 0.6
    top_p: float = 0.95
    answer_max_tokens: int = 64
    stop_at_answer_close: bool = True
    max_events_per_rollout: int = 200
    max_calibration_events_per_rollout: int = 100
    forced_batch_size: int = 16
    eval_batch_size: int = 8
    eval_require_boxed: bool = False
    exit_label: str = "forced"  # forced (LYNX) or no_regret (probes.collect.EXIT_LABELS)
    eval_temperature: float = 0.0  # held-out decoding: 0 greedy, else sampled (every arm with the same seeds)
    eval_top_p: float = 0.95
    eval_samples: int = 1  # sampled held-out decoding: rollouts per problem and arm (seeds evaluate.sample_seed)
    probe: ProbeTrainConfig = field(default_factory=ProbeTrainConfig)
    seed: int = 0
    progress: bool = True
    device: str = "auto"  # auto: cuda when available, else cpu (algos.device)
    dtype: str = "auto"   # auto: bfloat16 on cuda, float32 on cpu

    @property
    def events_dir(self) -> Path:
        return Path(self.data_dir) if self.data_dir else Path(f"{str(self.output_dir).rstrip('/')}-events")


def validate(cfg: LynxJobConfig) -> None:
    """Raise :class:`LynxJobError` naming the first bad setting."""
    out, data = Path(cfg.output_dir).resolve(), cfg.events_dir.resolve()
    checks = [
        (0 < cfg.confidence < 1, f"--confidence must be in (0, 1), got {cfg.confidence}"),
        (all(0 < c < 1 for c in cfg.eval_confidences), f"--eval_confidences must be in (0, 1), got {cfg.eval_confidences}"),
        (cfg.num_problems >= 4, f"--num_problems must be >= 4 (probe-train and calibration), got {cfg.num_problems}"),
        (cfg.num_eval_problems >= 0, f"--num_eval_problems must be >= 0, got {cfg.num_eval_problems}"),
        (0 < cfg.calibration_fraction < 1, f"--calibration_fraction must be in (0, 1), got {cfg.calibration_fraction}"),
        (cfg.cue_preset in ("auto", "words", "linebreak"), f"--cue_preset must be auto, words or linebreak, got '{cfg.cue_preset}'"),
        (cfg.max_calibration_events_per_rollout >= 1, "--max_calibration_events_per_rollout must be >= 1"),
        (cfg.exit_label in EXIT_LABELS, f"--exit_label must be one of {', '.join(EXIT_LABELS)}, got '{cfg.exit_label}'"),
        (cfg.eval_temperature >= 0 and 0 < cfg.eval_top_p <= 1,
         f"--eval_temperature must be >= 0 and --eval_top_p in (0, 1], got {cfg.eval_temperature}, {cfg.eval_top_p}"),
        (cfg.eval_batch_size >= 1, f"--eval_batch_size must be >= 1, got {cfg.eval_batch_size}"),
        (cfg.eval_samples >= 1 and (cfg.eval_samples == 1 or cfg.eval_temperature > 0),
         f"--eval_samples must be >= 1, and > 1 only with --eval_temperature > 0 (greedy decoding repeats itself), "
         f"got {cfg.eval_samples} at temperature {cfg.eval_temperature}"),
        (cfg.max_new_tokens is None or cfg.max_new_tokens >= 1, f"--max_new_tokens must be >= 1, got {cfg.max_new_tokens}"),
        ("{question}" in cfg.prompt_template, "--prompt_template must contain {question}"),
        (out != data and out not in data.parents and data not in out.parents,
         f"--data_dir '{cfg.events_dir}' and --output_dir '{cfg.output_dir}' must not contain each other "
         "(the export replaces its whole directory)"),
    ]
    for ok, message in checks:
        if not ok:
            raise LynxJobError(message)


def load_problems(cfg: LynxJobConfig) -> tuple[list[dict], list[dict]]:
    """(training pool, held-out problems), disjoint; the pool without repeated questions."""
    if cfg.dataset in SYNTHETIC_TASKS:
        task = ArithmeticTask(cfg.arithmetic_digits, cfg.arithmetic_operands, cfg.arithmetic_operators)
        drawn = load_records(cfg.dataset, "train", 4 * cfg.num_problems, cfg.seed, arithmetic=task)
        seen, pool = set(), []
        for r in drawn:  # the train split draws with repeats; keep problems distinct
            if r["question"] not in seen:
                seen.add(r["question"])
                pool.append(r)
        pool = pool[:cfg.num_problems]
        if len(pool) < cfg.num_problems:
            raise LynxJobError(f"the {cfg.dataset} task has only {len(pool)} distinct train problems; "
                               "lower --num_problems or use more digits/operands")
        held = (load_records(cfg.dataset, "test", cfg.num_eval_problems, cfg.seed, arithmetic=task)
                if cfg.num_eval_problems else [])
        return pool, held
    records = load_records(cfg.dataset, "train", None, cfg.seed, cfg.question_column, cfg.answer_column)
    if len(records) < cfg.num_problems + cfg.num_eval_problems:
        raise DataConfigError(f"dataset '{cfg.dataset}' has {len(records)} records, fewer than --num_problems + "
                              f"--num_eval_problems = {cfg.num_problems + cfg.num_eval_problems}")
    held = records[len(records) - cfg.num_eval_problems:] if cfg.num_eval_problems else []
    return records[:cfg.num_problems], held


def resolve_settings(cfg: LynxJobConfig, model, tokenizer) -> CollectConfig:
    """Cue settings, exit string and layers for this model (presets unless given)."""
    thinking = has_thinking_block(tokenizer)
    if cfg.cues:
        cues = CueConfig(tuple(cfg.cues), True, THINK_END if thinking else ANSWER_START)
    else:
        preset = cfg.cue_preset if cfg.cue_preset != "auto" else ("words" if thinking else "linebreak")
        cues = cue_preset(preset, thinking)
    n_layers = model.config.num_hidden_layers
    layers = tuple(cfg.layers) if cfg.layers else default_layers(n_layers)
    if any(not 0 <= i <= n_layers for i in layers):
        raise LynxJobError(f"--layers {','.join(map(str, layers))} out of range: this model has hidden states 0..{n_layers}")
    return CollectConfig(
        layers=layers, cue_config=cues, exit_string=cfg.exit_string or default_exit_string(thinking),
        prompt_template=cfg.prompt_template, batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature, top_p=cfg.top_p, answer_max_tokens=cfg.answer_max_tokens,
        stop_at_answer_close=cfg.stop_at_answer_close, max_events_per_rollout=cfg.max_events_per_rollout,
        forced_batch_size=cfg.forced_batch_size, seed=cfg.seed)


def decoding_label(temperature: float, top_p: float) -> str:
    return f"sampled at T = {temperature}, top-p {top_p}" if temperature else "greedy"


def _phase(k: int, name: str, detail: str) -> float:
    print(f"[lynx {k}/5] {name}: {detail}", flush=True)
    return time.perf_counter()


def _events_summary(events: EventSet) -> dict:
    return {"events": len(events), "positive_rate": events.positive_rate,
            "problems": int(events.problem.unique().numel()), "synthetic_events": int(events.synthetic.sum())}


def _train(cfg: LynxJobConfig, train_events: EventSet):
    n_pos = int(train_events.labels.sum())
    n_neg = len(train_events) - n_pos
    if n_pos < 2 or n_neg < 2:
        raise LynxJobError(
            f"the probe needs at least 2 events of each label; the {len(train_events)} probe-training events have "
            f"{n_pos} safe and {n_neg} continue: use more problems (--num_problems), an easier dataset "
            "(--dataset arithmetic) or a stronger model")
    bar = tqdm(total=cfg.probe.max_epochs, desc="train: probe", unit="epoch", disable=not cfg.progress)

    def tick(epoch, val_loss):
        bar.update(1)
        bar.set_postfix(val_loss=f"{val_loss:.4f}")

    try:
        return train_probe(train_events.features, train_events.labels, cfg.probe, progress=tick)
    finally:
        bar.close()


def run_lynx_job(cfg: LynxJobConfig) -> dict:
    """Run the whole job; returns (and writes to ``output_dir/summary.json``) every figure."""
    validate(cfg)
    out_dir, events_dir = Path(cfg.output_dir), cfg.events_dir
    pool, held = load_problems(cfg)
    tokenizer = load_tokenizer(cfg.model_name_or_path)
    if cfg.max_new_tokens is None:
        cfg.max_new_tokens = default_max_new_tokens(tokenizer)
    device, dtype = resolve_device_dtype(cfg.device, cfg.dtype)
    model = load_causal_lm(cfg.model_name_or_path, dtype=dtype).to(device).eval()
    collect_cfg = resolve_settings(cfg, model, tokenizer)
    identity = base_identity(model)  # the export records the weight fingerprint
    print(f"[lynx] model {identity['name']} ({identity['num_hidden_layers']} layers, hidden {identity['hidden_size']}); "
          f"{len(pool)} training + {len(held)} held-out problems from '{cfg.dataset}'; cues "
          f"{list(collect_cfg.cue_config.cues)!r}, exit string {collect_cfg.exit_string!r}, layers "
          f"{list(collect_cfg.layers)}; {device} {dtype_name(dtype)}; export -> {out_dir}, events -> {events_dir}",
          flush=True)
    timings = {}

    t0 = _phase(1, "collect", f"{len(pool) + len(held)} rollouts (T={cfg.temperature}, top-p {cfg.top_p}, "
                              f"<= {cfg.max_new_tokens} tokens), forced exits (<= {cfg.answer_max_tokens} answer tokens)")
    shards = collect_events(model, tokenizer, pool + held, events_dir, collect_cfg, progress=cfg.progress)
    timings["collect_s"] = round(time.perf_counter() - t0, 1)
    train_idx, calib_idx = split_problems(len(pool), cfg.calibration_fraction, cfg.seed)
    test_idx = list(range(len(pool), len(pool) + len(held)))
    correct = shards.rollout_correct(tokenizer, pool + held) if cfg.exit_label != "forced" else {}
    train_events = shards.load(train_idx, cfg.max_events_per_rollout).relabelled(cfg.exit_label, correct)
    calib_events = shards.load(calib_idx, cfg.max_calibration_events_per_rollout).relabelled(cfg.exit_label, correct)
    test_forced = shards.load(test_idx, cfg.max_calibration_events_per_rollout)
    test_events = test_forced.relabelled(cfg.exit_label, correct)
    rollouts = shards.rollouts()
    in_pool = rollouts["problem"] < len(pool)
    collection = {
        "rollouts": int(in_pool.sum()),
        "mean_response_tokens": float(rollouts["response_len"][in_pool].float().mean()),
        "mean_cues_per_rollout": float(rollouts["num_cues"][in_pool].float().mean()),
        "rollouts_without_cue": int((rollouts["num_cues"][in_pool] == 0).sum()),
        "train": _events_summary(train_events), "calibration": _events_summary(calib_events),
        "held_out": _events_summary(test_events), "exit_label": cfg.exit_label,
    }
    if correct:
        collection["rollout_accuracy"] = sum(correct[p] for p in train_idx + calib_idx) / len(pool)

    t0 = _phase(2, "train", f"MLP {list(cfg.probe.hidden)} on {len(train_events)} events of {len(train_idx)} problems")
    probe, train_metrics = _train(cfg, train_events)
    timings["train_s"] = round(time.perf_counter() - t0, 1)

    t0 = _phase(3, "calibrate", f"split conformal on {len(calib_events)} events of {len(calib_idx)} other problems")
    p_cal = probe.predict_proba(calib_events.features)
    calibration = ConformalCalibration.from_probs(p_cal, calib_events.labels)
    confidences = sorted({cfg.confidence, *cfg.eval_confidences})
    calib_rows = []
    for c in confidences:
        rule = calibration.rule(confidence=c)
        calib_rows.append({"confidence": c, "delta": rule.delta, "q_safe": rule.q_safe, "q_continue": rule.q_continue,
                           "calibration_exit_rate": float(rule.should_exit(p_cal).float().mean()) if len(p_cal) else math.nan})
    calib_metrics = {"auc": roc_auc(p_cal, calib_events.labels), "n_safe": calibration.sizes[0],
                     "n_continue": calibration.sizes[1], "max_confidence": calibration.max_confidence(),
                     "rules": calib_rows}
    timings["calibrate_s"] = round(time.perf_counter() - t0, 1)

    t0 = _phase(4, "export", str(out_dir))
    bundle = LynxProbe(probe=probe, calibration=calibration, layers=collect_cfg.layers,
                       cue_config=collect_cfg.cue_config, exit_string=collect_cfg.exit_string, base_model=identity,
                       answer_max_tokens=cfg.answer_max_tokens, default_confidence=cfg.confidence,
                       calibrated_with={"dtype": dtype_name(dtype), "routing": False},
                       metrics={"collection": collection, "training": train_metrics, "calibration": calib_metrics,
                                "collect_settings": collect_cfg.to_dict(), "dataset": cfg.dataset})
    save_probe(out_dir, bundle)
    timings["export_s"] = round(time.perf_counter() - t0, 1)

    evaluation = None
    if held:
        times = f" x {cfg.eval_samples} samples" if cfg.eval_samples > 1 else ""
        t0 = _phase(5, "evaluate", f"{len(held)} held-out problems: premature exits on {len(test_events)} events, "
                                   f"{decoding_label(cfg.eval_temperature, cfg.eval_top_p)} decoding{times} without exits "
                                   f"and at c = {', '.join(map(str, cfg.eval_confidences))}")
        p_test = bundle.score(test_events.features) if len(test_events) else torch.zeros(0)
        evaluation = {
            "held_out_auc": roc_auc(p_test, test_events.labels) if len(test_events) else math.nan,
            "premature_exits": premature_exit_rates(bundle, test_events, confidences),
            # the same exits judged by LYNX's forced-exit labels (differs under --exit_label no_regret)
            "premature_exits_forced_label": (premature_exit_rates(bundle, test_forced, confidences)
                                             if cfg.exit_label != "forced" else None),
            "decoding": evaluate_decoding(model, tokenizer, bundle, held, cfg.eval_confidences,
                                          prompt_template=cfg.prompt_template, max_new_tokens=cfg.max_new_tokens,
                                          batch_size=cfg.eval_batch_size, stop_at_answer_close=cfg.stop_at_answer_close,
                                          require_boxed=cfg.eval_require_boxed, temperature=cfg.eval_temperature,
                                          top_p=cfg.eval_top_p, seed=cfg.seed, samples=cfg.eval_samples,
                                          progress=cfg.progress),
        }
        timings["evaluate_s"] = round(time.perf_counter() - t0, 1)
    else:
        print("[lynx 5/5] evaluate: skipped (--num_eval_problems 0)", flush=True)

    job = asdict(cfg)
    summary = {"output_dir": str(out_dir), "events_dir": str(events_dir), "model": identity, "job": job,
               "collection": collection, "training": train_metrics, "calibration": calib_metrics,
               "evaluation": evaluation, "timings": timings}
    write_json_atomic(out_dir / "summary.json", summary)
    print(format_summary(summary), flush=True)
    return summary


def _f(x, digits=3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else (
        "inf" if isinstance(x, float) and math.isinf(x) else f"{x:.{digits}f}")


def _premature_lines(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        lo, hi = r.get("premature_exit_rate_ci95", (math.nan, math.nan))
        out.append(f"  c={r['confidence']:<5} rate {_f(r['premature_exit_rate'])} [95% CI {_f(lo)}, {_f(hi)}] "
                   f"vs delta {r['delta']:.3f} ({r['continue_events']} continue events); safe events exiting "
                   f"{_f(r['safe_exit_rate'])}")
    return out


def format_summary(s: dict) -> str:
    """The end-of-run report as text."""
    c, t, cal, ev = s["collection"], s["training"], s["calibration"], s["evaluation"]
    all_events = c["train"]["events"] + c["calibration"]["events"] + c["held_out"]["events"]
    lines = [
        "", "== LYNX summary ==",
        f"rollouts     {c['rollouts']} training problems, mean {c['mean_response_tokens']:.1f} tokens, "
        f"{c['mean_cues_per_rollout']:.2f} cues per rollout, {c['rollouts_without_cue']} without a cue (synthetic event)",
        f"events       {all_events} in all; probe-train {c['train']['events']} (positive rate "
        f"{_f(c['train']['positive_rate'])}), calibration {c['calibration']['events']} "
        f"({_f(c['calibration']['positive_rate'])}), held-out {c['held_out']['events']} ({_f(c['held_out']['positive_rate'])})",
        f"probe        val AUC {_f(t['val_auc'])} (train {_f(t['train_auc'])}), calibration AUC {_f(cal['auc'])}"
        + (f", held-out AUC {_f(ev['held_out_auc'])}" if ev else "")
        + f"; {t['epochs']} epochs (best {t['best_epoch']})",
        f"calibration  {cal['n_safe']} safe / {cal['n_continue']} continue scores; exits possible up to "
        f"c = {cal['max_confidence']:.3f}",
    ]
    for r in cal["rules"]:
        lines.append(f"  c={r['confidence']:<5} delta={r['delta']:.3f}  q_safe={_f(r['q_safe'])}  "
                     f"q_continue={_f(r['q_continue'])}  exit rate on calibration events {_f(r['calibration_exit_rate'])}")
    if ev:
        meaning = {"forced": "exiting is wrong", "no_regret": "exiting loses a correct answer"}[c.get("exit_label", "forced")]
        lines.append(f"held-out events: premature-exit rate P(exit | {meaning}) vs delta")
        lines += _premature_lines(ev["premature_exits"])
        if ev.get("premature_exits_forced_label"):
            lines.append("  judged by the forced-exit labels, P(exit | exiting is wrong):")
            lines += _premature_lines(ev["premature_exits_forced_label"])
        job = s.get("job", {})
        how = decoding_label(job.get("eval_temperature"), job.get("eval_top_p"))
        how += ", the same seeds in every arm" if job.get("eval_temperature") else ""
        k = job.get("eval_samples", 1)
        how += f", {k} samples per problem" if k > 1 else ""
        lines.append(f"held-out decoding ({how}):")
        for r in ev["decoding"]:
            extra = ""
            if "token_change" in r:
                extra = (f", tokens {r['token_change']:+.1%}, lost {r['lost_by_exit']} / gained {r['gained_by_exit']} "
                         f"{'rollouts' if k > 1 else 'problems'} by exiting")
            if "accuracy_change" in r:
                lo, hi = r["accuracy_change_ci95"]
                extra += f", accuracy {100 * r['accuracy_change']:+.1f} points [95% CI {100 * lo:+.1f}, {100 * hi:+.1f}]"
            lines.append(f"  {r['arm']:<8} accuracy {r['accuracy']:.3f}  mean new tokens {r['mean_new_tokens']:.1f}  "
                         f"exit rate {r['exit_rate']:.2f}{extra}")
    lines.append("time         " + ", ".join(f"{k[:-2]} {v:.0f} s" for k, v in s["timings"].items()))
    lines.append(f"outputs      probe -> {s['output_dir']} (summary.json), events -> {s['events_dir']}")
    return "\n".join(lines)


__all__ = ["LynxJobConfig", "LynxJobError", "default_max_new_tokens", "format_summary", "load_problems", "resolve_settings", "run_lynx_job",
           "validate"]
