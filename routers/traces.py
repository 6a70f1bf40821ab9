"""MCTS trace collection: search a target path for each example, on disk as it grows.

For example i (prompt, gold) MCTS (:mod:`routers.mcts`, seed = seed + i) searches paths whose
reward is the correctness of a short greedy generation (:class:`GenerationEvaluator`); the
result is one JSON line: the target path pi*, labels y_l = count of l in pi*, whether the base
path was right, layers saved L - |pi*|, whether pi* fixes a base error, search statistics.
Examples with no correct path are kept in the file (so a rerun does not search them again) but
marked ``kept: false`` and never used for training (Dr.LLM, arXiv 2510.12773, Sec. 3.1).

File ``traces.jsonl``: line 1 is a header (settings + base model identity), written atomically;
then one line per searched example, appended and flushed as soon as it is done. A rerun with
the same header skips the examples already searched (resume; a torn last line from a crash is
dropped); a different header stops with one line naming the differing setting.
"""
from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from algos.device import dtype_name
from algos.fingerprint import base_identity
from routers.mcts import MCTSConfig, mcts_search
from routers.path_eval import GenerationEvaluator, dense_completions
from routers.routed_model import RoutedModel

TRACE_FORMAT = "repro-rl/drllm-traces"
TRACE_VERSION = 2  # 2: the header names the weights by algos.fingerprint, and the dtype


class TraceError(ValueError):
    """A trace file that cannot be resumed with the settings given; the message says what to fix."""


def trace_header(model, settings: dict, mcts: MCTSConfig) -> dict:
    """What must match for a rerun to resume: format, base identity, caller settings, MCTS config."""
    return {"kind": "header", "format": TRACE_FORMAT, "version": TRACE_VERSION,
            "base_model": base_identity(model), "dtype": dtype_name(next(model.parameters()).dtype),
            "settings": dict(settings), "mcts": asdict(mcts)}


def _diff(saved, current, prefix: str = "") -> str | None:
    """First differing key between two nested dicts, as 'a.b: saved -> current'."""
    if isinstance(saved, dict) and isinstance(current, dict):
        for key in sorted(set(saved) | set(current)):
            found = _diff(saved.get(key), current.get(key), f"{prefix}{key}.")
            if found:
                return found
        return None
    return None if saved == current else f"{prefix[:-1]}: {saved!r} in the file, {current!r} now"


def read_traces(path: str | os.PathLike, header: dict | None = None) -> tuple[dict, list[dict]]:
    """(header, records) of a trace file; with ``header``, check it matches the file's."""
    path = Path(path)
    lines = path.read_text().split("\n")
    try:
        saved = json.loads(lines[0])
    except json.JSONDecodeError:
        saved = None
    if not isinstance(saved, dict) or saved.get("format") != TRACE_FORMAT:
        raise TraceError(f"'{path}' is not a Dr.LLM trace file; choose another --output_dir or remove it")
    if header is not None and saved.get("version") != TRACE_VERSION:
        raise TraceError(f"'{path}' was written by another repro-rl version (trace format v{saved.get('version')}, "
                         f"this one writes v{TRACE_VERSION}); choose another --output_dir or remove it")
    if header is not None:
        diff = _diff(json.loads(json.dumps(saved)), json.loads(json.dumps(header)))
        if diff:
            raise TraceError(f"'{path}' was searched with other settings ({diff}); use the same settings "
                             "to resume, or another --output_dir")
    records = []
    for line in lines[1:]:
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a torn last line from an interrupted run: searched again
    return saved, records


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def open_traces(path: str | os.PathLike, header: dict) -> list[dict]:
    """Create the file with its header, or check and clean an existing one; returns its records."""
    path = Path(path)
    if not path.exists():
        _write_atomic(path, json.dumps(header) + "\n")
        return []
    _, records = read_traces(path, header)
    clean = json.dumps(header) + "\n" + "".join(json.dumps(r) + "\n" for r in records)
    if path.read_text() != clean:  # drop a torn tail so appends start on a fresh line
        _write_atomic(path, clean)
    return records


def search_example(routed: RoutedModel, tokenizer, index: int, record: dict, prompt: str,
                   mcts: MCTSConfig, max_new_tokens: int, require_boxed: bool, make_evaluator=None,
                   **evaluator_options) -> dict:
    """Run MCTS for one example and return its trace line. ``make_evaluator`` (default
    :class:`GenerationEvaluator`; same positional arguments, then ``evaluator_options`` such as
    ``draft``, ``verify_draft``, ``length_factor``, ``reward``) builds the path -> reward callable."""
    start = time.perf_counter()
    make_evaluator = make_evaluator or GenerationEvaluator
    evaluator = make_evaluator(routed, tokenizer, prompt, record["answer"], max_new_tokens, require_boxed,
                               **evaluator_options)
    cfg = MCTSConfig(**{**asdict(mcts), "seed": mcts.seed + index})
    result = mcts_search(evaluator, routed.num_layers, cfg)
    base = tuple(range(routed.num_layers))
    target = result.target
    return {
        "index": index, "question": record["question"], "answer": str(record["answer"]), "prompt": prompt,
        "kept": target is not None, "target": None if target is None else list(target), "labels": result.labels,
        "base_correct": result.base_correct, "fixed_base_error": result.fixed_base_error,
        "layers": None if target is None else len(target), "layers_saved": result.layers_saved,
        "base_completion": evaluator.last_completions.get(base),
        "target_completion": None if target is None else evaluator.last_completions.get(target),
        "stop_reason": result.stop_reason, "simulations": result.simulations, "evaluations": result.evaluations,
        "draft_accepted": getattr(evaluator, "draft_accepted", None),
        "target_agreement": None if target is None else getattr(evaluator, "agreements", {}).get(target),
        "tree_nodes": result.tree_nodes, "max_children": result.max_children, "max_depth": result.max_depth,
        "seconds": round(time.perf_counter() - start, 3),
    }


def summarize(records: Sequence[dict], num_layers: int) -> dict:
    """Kept/searched, base accuracy, base errors fixed, layers saved and stop reasons."""
    kept = [r for r in records if r["kept"]]
    return {
        "searched": len(records), "kept": len(kept), "dropped": len(records) - len(kept),
        "base_correct": sum(r["base_correct"] for r in records),
        "fixed_base_errors": sum(r["fixed_base_error"] for r in records),
        "mean_layers_saved": statistics.mean(r["layers_saved"] for r in kept) if kept else 0.0,
        "mean_target_layers": statistics.mean(r["layers"] for r in kept) if kept else float(num_layers),
        "num_layers": num_layers,
        "repeats_in_targets": sum(r["labels"].count(2) for r in kept),
        "evaluations": sum(r["evaluations"] for r in records),
        "draft_accepted": sum(r.get("draft_accepted") or 0 for r in records),
        "seconds": round(sum(r["seconds"] for r in records), 1),
        "stop_reasons": dict(Counter(r["stop_reason"] for r in records)),
    }


def format_summary(s: dict) -> str:
    return (f"kept {s['kept']}/{s['searched']} searched ({s['dropped']} without a correct path), "
            f"base correct {s['base_correct']}/{s['searched']}, base errors fixed {s['fixed_base_errors']}, "
            f"mean layers saved {s['mean_layers_saved']:.2f} of {s['num_layers']} "
            f"(target paths {s['mean_target_layers']:.2f} blocks, {s['repeats_in_targets']} repeats), "
            f"{s['evaluations']} path evaluations ({s['draft_accepted']} kept the dense output, no decoding) in "
            f"{s['seconds']:.0f} s, stops {s['stop_reasons']}")


def collect_traces(routed: RoutedModel, tokenizer, records: Sequence[dict], prompts: Sequence[str],
                   path: str | os.PathLike, settings: dict, mcts: MCTSConfig | None = None,
                   max_new_tokens: int = 15, require_boxed: bool = True, progress: bool = True,
                   make_evaluator=None, evaluator_options: dict | None = None,
                   draft_batch_size: int = 8) -> list[dict]:
    """Search every example not yet in ``path`` and append its trace; returns the traces of
    ``records`` (in order). ``settings`` (dataset, prompt template, ...) and ``evaluator_options``
    go into the header. With the default evaluator the dense completions are generated first, in
    batches of ``draft_batch_size``, and handed to each search as its draft."""
    from tqdm.auto import tqdm

    if len(records) != len(prompts):
        raise ValueError(f"{len(records)} records but {len(prompts)} prompts")
    mcts = mcts or MCTSConfig()
    evaluator_options = dict(evaluator_options or {})
    settings = {**settings, "max_new_tokens": max_new_tokens, "require_boxed": require_boxed,
                "evaluator": evaluator_options}
    header = trace_header(routed.model, settings, mcts)
    done = {r["index"]: r for r in open_traces(path, header)}
    for i, record in enumerate(records):
        if i in done and done[i]["question"] != record["question"]:
            raise TraceError(f"'{path}' holds another question at example {i}; the data changed since the search, "
                             "use another --output_dir")
    todo = [i for i in range(len(records)) if i not in done]
    bar = tqdm(total=len(records), initial=len(records) - len(todo), desc="MCTS search", unit="ex",
               disable=not progress, dynamic_ncols=True)
    drafts: dict[int, object] = {}
    with open(path, "a") as f:
        for n, i in enumerate(todo):
            if make_evaluator is None and i not in drafts:  # the next batch of dense completions
                batch = todo[n:n + draft_batch_size]
                drafts = dict(zip(batch, dense_completions(routed, tokenizer, [prompts[j] for j in batch],
                                                           max_new_tokens, draft_batch_size)))
            options = {**evaluator_options, **({"draft": drafts[i]} if make_evaluator is None else {})}
            trace = search_example(routed, tokenizer, i, records[i], prompts[i], mcts, max_new_tokens,
                                   require_boxed, make_evaluator, **options)
            f.write(json.dumps(trace) + "\n")
            f.flush()
            os.fsync(f.fileno())
            done[i] = trace
            current = [done[j] for j in sorted(done) if j < len(records)]
            s = summarize(current, routed.num_layers)
            bar.set_postfix(kept=f"{s['kept']}/{s['searched']}", fixed=s["fixed_base_errors"],
                            saved=f"{s['mean_layers_saved']:.2f}", refresh=False)
            bar.update(1)
    bar.close()
    return [done[i] for i in range(len(records))]
