"""Exact path search over a fixed set of candidate paths, batched across examples (ours).

MCTS (:mod:`routers.mcts`) scores one path of one example at a time. For a thinking model the
exact reward (is the path's greedy answer correct?) is a free generation of ~100-300 tokens, so a
search costs minutes per example on a CPU, and the cheap teacher-forced proxy (``agreement``)
accepts paths that break free decoding. Here the search space is a short list of candidate paths
(the dense path always among them), and every candidate is generated greedily on every search
example, in full batches of examples that share the path. Each example's target is then chosen
by the MCTS length rule: the shortest path whose answer is correct, ties broken by fewer distinct
blocks, then by the candidate right on most search examples (:func:`robust_target`), so that the
router sees one consistent target wherever the most robust skip works instead of whichever path
sorts first; an example with no correct candidate is dropped.

Candidates are written as skip sets, e.g. ``"3;5;3,5"`` = skip block 3 / skip 5 / skip both.
``scripts/drllm_screen.py`` measures each single skip's accuracy on the search problems, which is
how to choose them. Results are appended per candidate to ``candidates.jsonl`` (header as in
:mod:`routers.traces`), so an interrupted search resumes at the next candidate.
"""
from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from rewards.verify import is_correct
from routers.mcts import MCTSConfig, select_target
from routers.path_eval import encode_left_padded
from routers.paths import default_path, path_to_actions
from routers.routed_model import RoutedModel
from routers.traces import TraceError, open_traces, trace_header


def parse_skip_sets(text: str, num_layers: int) -> list[tuple[int, ...]]:
    """``"3;5;3,5"`` -> [(3,), (5,), (3, 5)]: skip sets separated by ';', blocks by ','."""
    sets = []
    for part in text.split(";"):
        part = part.strip()
        if not part:
            continue
        try:
            blocks = tuple(sorted({int(b) for b in part.split(",")}))
        except ValueError:
            raise TraceError(f"candidate skip set '{part}' is not a comma-separated list of block indices") from None
        bad = [b for b in blocks if not 0 <= b < num_layers]
        if bad:
            raise TraceError(f"candidate skip set '{part}' names block {bad[0]}; this model has blocks 0..{num_layers - 1}")
        if len(blocks) >= num_layers:
            raise TraceError(f"candidate skip set '{part}' skips every block")
        sets.append(blocks)
    if not sets:
        raise TraceError(f"no candidate skip set in '{text}'; write them like '3;5;3,5'")
    return list(dict.fromkeys(sets))


def skip_path(skips: Sequence[int], num_layers: int) -> tuple[int, ...]:
    """The dense path without the blocks in ``skips``."""
    return tuple(b for b in range(num_layers) if b not in set(skips))


@torch.no_grad()
def path_correctness(routed: RoutedModel, tokenizer, prompts: Sequence[str], golds: Sequence[str],
                     path: Sequence[int], max_new_tokens: int, require_boxed: bool = True,
                     batch_size: int = 16, budgets: Sequence[int] | None = None, bar=None) -> tuple[list[bool], list[int]]:
    """(is each greedy completion under ``path`` correct, its new-token count), in batches of
    ``batch_size`` examples; ``budgets`` (one per example) caps each batch at its largest budget."""
    eos = getattr(getattr(routed.model, "generation_config", None), "eos_token_id", None)
    eos = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
    correct, lengths = [], []
    for start in range(0, len(prompts), batch_size):
        ids, mask = encode_left_padded(tokenizer, prompts[start:start + batch_size], routed.device)
        budget = max_new_tokens if budgets is None else min(max_new_tokens, max(budgets[start:start + batch_size]))
        out = routed.generate(ids, mask, actions=list(path), max_new_tokens=budget,
                              pad_token_id=tokenizer.pad_token_id)
        for row, gold in zip(out.sequences[:, ids.shape[1]:].tolist(), golds[start:start + batch_size]):
            end = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
            text = tokenizer.batch_decode([row[:end]], skip_special_tokens=True)[0]
            correct.append(bool(is_correct(text, str(gold), require_boxed)))
            lengths.append(end)
        if bar is not None:
            bar.update(len(ids))
    return correct, lengths


def candidate_search(routed: RoutedModel, tokenizer, records: Sequence[dict], prompts: Sequence[str],
                     skip_sets: Sequence[Sequence[int]], out_dir: str | os.PathLike, settings: dict,
                     max_new_tokens: int, require_boxed: bool = True, batch_size: int = 16,
                     length_factor: float | None = 2.0, progress: bool = True) -> list[dict]:
    """Evaluate the dense path and every candidate on every example (resumable through
    ``out_dir/candidates.jsonl``), then write ``out_dir/traces.jsonl`` with one trace per example
    in the format of :func:`routers.traces.search_example`; returns those traces."""
    from tqdm.auto import tqdm

    L = routed.num_layers
    dense = default_path(L)
    paths = [dense] + [p for p in (skip_path(s, L) for s in skip_sets) if p != dense]
    out_dir = Path(out_dir)
    settings = {**settings, "max_new_tokens": max_new_tokens, "require_boxed": require_boxed,
                "search": "candidates", "length_factor": length_factor,
                "questions": len(records), "first_question": records[0]["question"] if records else None}
    header = trace_header(routed.model, settings, MCTSConfig(simulations=0, early_stop=False))
    if (out_dir / "traces.jsonl").exists() and not (out_dir / "candidates.jsonl").exists():
        raise TraceError(f"'{out_dir / 'traces.jsonl'}' holds an MCTS search; choose another --output_dir for the "
                         "candidate search")
    results = {tuple(r["path"]): r for r in open_traces(out_dir / "candidates.jsonl", header)}
    golds = [str(r["answer"]) for r in records]
    todo = [p for p in paths if p not in results]
    bar = tqdm(total=len(todo) * len(records), desc="candidate paths", unit="gen", disable=not progress,
               dynamic_ncols=True)
    with open(out_dir / "candidates.jsonl", "a") as f:
        for path in todo:
            start = time.perf_counter()
            budgets = None
            if path != dense and length_factor:  # a path that diverges stops at factor x the dense length
                budgets = [max(32, math.ceil(length_factor * n)) for n in results[dense]["lengths"]]
            label = ",".join(str(b) for b in range(L) if b not in path) or "none (dense)"
            bar.set_postfix(skips=label, refresh=True)
            correct, lengths = path_correctness(routed, tokenizer, prompts, golds, path, max_new_tokens,
                                                require_boxed, batch_size, budgets, bar)
            line = {"path": list(path), "correct": correct, "lengths": lengths,
                    "accuracy": sum(correct) / len(correct), "seconds": round(time.perf_counter() - start, 1)}
            f.write(json.dumps(line) + "\n")
            f.flush()
            os.fsync(f.fileno())
            results[path] = line
            tqdm.write(f"[candidates] skip {label}: accuracy {line['accuracy']:.3f} in {line['seconds']:.0f} s")
    bar.close()
    traces = [_trace(i, records[i], prompts[i], paths, results, L) for i in range(len(records))]
    tmp = out_dir / "traces.jsonl.tmp"
    tmp.write_text("".join(json.dumps(t) + "\n" for t in [header] + traces))
    os.replace(tmp, out_dir / "traces.jsonl")
    return traces


def robust_target(rewards: dict[tuple[int, ...], float], accuracy: dict[tuple[int, ...], float],
                  correct_at: float = 1.0) -> tuple[int, ...] | None:
    """Shortest correct path; ties: fewer distinct blocks, then higher ``accuracy`` (the path's share of
    correct search examples), then :func:`routers.mcts.select_target`'s order. ``None`` if none is correct."""
    correct = {p: r for p, r in rewards.items() if r >= correct_at}
    if not correct:
        return None
    shortest = min((len(p), len(set(p))) for p in correct)
    tied = {p: r for p, r in correct.items() if (len(p), len(set(p))) == shortest}
    best = max(accuracy[p] for p in tied)
    return select_target({p: r for p, r in tied.items() if accuracy[p] == best}, correct_at)


def _trace(i: int, record: dict, prompt: str, paths: Sequence[tuple[int, ...]], results: dict, L: int) -> dict:
    """One example's trace: the MCTS target rule over the candidates' rewards."""
    rewards = {p: float(results[p]["correct"][i]) for p in paths}
    dense = default_path(L)
    target = robust_target(rewards, {p: results[p]["accuracy"] for p in paths})
    base_correct = rewards[dense] == 1.0
    return {
        "index": i, "question": record["question"], "answer": str(record["answer"]), "prompt": prompt,
        "kept": target is not None, "target": None if target is None else list(target),
        "labels": None if target is None else path_to_actions(target, L),
        "base_correct": base_correct, "fixed_base_error": (not base_correct) and target is not None,
        "layers": None if target is None else len(target),
        "layers_saved": None if target is None else L - len(target),
        "stop_reason": "candidates", "simulations": len(paths), "evaluations": len(paths),
        "seconds": round(sum(results[p]["seconds"] for p in paths) / max(len(results[dense]["correct"]), 1), 3),
    }
