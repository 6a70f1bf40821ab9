"""LYNX data collection: cue events, their features and forced-exit labels, on disk as they grow.

LYNX (arXiv 2512.05325, reference ``farukakgul/LYNX``) labels each cue event of a sampled rollout
by a **forced exit**: the tokens before the cue-completing token, then the exit string, then a
greedy answer of at most 64 tokens, graded; label 1 ("safe to exit") iff the answer is correct.
Per batch of problems (one sampled rollout each, T = 0.6, top-p 0.95):

1. **Rollouts and features in one pass**: :func:`probes.early_exit.lynx_generate` with
   ``record_features=True`` returns per row the cue events (token completing a cue inside the
   thinking region; a row without any gets one synthetic event at 70% of its thinking length) and
   their hidden states at ``layers``, from the generation's own forward passes. At most
   ``max_events_per_rollout`` events per rollout are kept (an evenly spaced subset).
2. **Forced exits on token ids**: the input of event (row, i) is
   ``prompt + response[:i] + exit_ids`` (the cue-completing token dropped, nothing re-tokenised).
   The prefix is already in the rollout's KV cache, so the events are decoded with
   ``model.generate`` from a copy of that cache's rows for the batch (:func:`select_cache_rows`,
   never a copy of the whole multi-row cache), in batches of ``forced_batch_size``: the row's
   attention mask hides the cache slots from ``i`` on, so the exit string continues at position
   ``prompt + i`` (the rollback trick of the online decoder). Answers are greedy, at most
   ``answer_max_tokens``; with ``stop_at_answer_close`` (default) they stop once the brace the
   exit string opened (``\\boxed{``) is closed, as the online decoder does with the same flag.
   Grading: ``rewards.verify.is_correct(exit_string + answer, gold)``.
3. **On disk as it grows**: batch k of the problem list becomes ``shard-0000k.safetensors``
   (features float32 (N, D), labels, problem index, event index, synthetic flag, answer ids; and
   per rollout its problem index, response ids, length and number of cue events), written to a
   temporary file and renamed, then recorded in ``progress.json`` (settings, model identity with
   its weight fingerprint (:mod:`algos.fingerprint`) and dtype, a fingerprint of the problems,
   shards done), also written atomically. A rerun with the same
   settings skips the shards already done (resume; each batch has its own seed, so the result
   equals an uninterrupted run); other settings, problems or another model stop with one line.
4. :class:`EventShards` reads a collection back; ``load(problems)`` concatenates the events of a
   set of problems, so probe training and calibration use disjoint problems
   (:func:`split_problems`).
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from algos.data import build_prompt
from algos.hf_compat import cache_arg
from algos.device import dtype_name
from algos.fingerprint import base_identity
from probes.cues import EXIT_STRING_THINKING, CueConfig
from probes.early_exit import NeverExit, _closes, lynx_generate
from rewards.verify import is_correct

FORMAT = "repro-rl/lynx-events"
VERSION = 2  # 2: the model identity has weights_fingerprint and dtype
PROGRESS_FILE = "progress.json"
LYNX_PROMPT_TEMPLATE = "{question}\nPlease reason step by step, and put your final answer within \\boxed{{}}."


# How a cue event is labelled "safe to exit" (1) or "continue" (0):
# - forced (LYNX, arXiv 2512.05325): 1 iff the forced answer (prefix + exit string + greedy answer) is correct;
# - no_regret: 1 iff exiting costs nothing against continuing this rollout: the forced answer is correct,
#   or the rollout's own final answer is wrong. The conformal bound then reads P(exit | exiting loses a
#   correct answer) <= delta: the events the forced label calls unsafe only because the rollout is wrong
#   anyway (its post-answer re-checks) may exit.
EXIT_LABELS = ("forced", "no_regret")


class CollectError(ValueError):
    """Bad collection settings or a collection directory made otherwise; one line naming the fix."""


@dataclass(frozen=True)
class CollectConfig:
    """Everything that determines the collected events (saved in ``progress.json``)."""

    layers: tuple[int, ...]
    cue_config: CueConfig = field(default_factory=CueConfig)
    exit_string: str = EXIT_STRING_THINKING
    prompt_template: str = LYNX_PROMPT_TEMPLATE
    batch_size: int = 8
    max_new_tokens: int = 512
    temperature: float = 0.6
    top_p: float = 0.95
    answer_max_tokens: int = 64
    stop_at_answer_close: bool = True
    max_events_per_rollout: int = 200
    synthetic_event_at: float = 0.7
    forced_batch_size: int = 16
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
        checks = [
            (bool(self.layers), "layers must name at least one hidden-state index"),
            (bool(self.exit_string), "exit_string must not be empty"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}"),
            (self.temperature > 0, f"temperature must be > 0, got {self.temperature}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.answer_max_tokens >= 1, f"answer_max_tokens must be >= 1, got {self.answer_max_tokens}"),
            (self.max_events_per_rollout >= 1, f"max_events_per_rollout must be >= 1, got {self.max_events_per_rollout}"),
            (0 < self.synthetic_event_at < 1, f"synthetic_event_at must be in (0, 1), got {self.synthetic_event_at}"),
            (self.forced_batch_size >= 1, f"forced_batch_size must be >= 1, got {self.forced_batch_size}"),
        ]
        for ok, message in checks:
            if not ok:
                raise CollectError(message)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["layers"] = list(self.layers)
        data["cue_config"] = self.cue_config.to_dict()
        return data


def split_problems(num_problems: int, calibration_fraction: float = 0.5, seed: int = 0) -> tuple[list[int], list[int]]:
    """(probe-train, calibration) problem indices: a seeded permutation, ``round(fraction * n)``
    (at least 1 each) to calibration. Disjoint by construction."""
    if not 0 < calibration_fraction < 1:
        raise CollectError(f"calibration_fraction must be in (0, 1), got {calibration_fraction}")
    if num_problems < 2:
        raise CollectError(f"need at least 2 problems to split into probe-train and calibration, got {num_problems}")
    order = torch.randperm(num_problems, generator=torch.Generator().manual_seed(seed)).tolist()
    k = min(max(round(calibration_fraction * num_problems), 1), num_problems - 1)
    return sorted(order[k:]), sorted(order[:k])


def evenly_spaced(n: int, cap: int) -> list[int]:
    """``min(n, cap)`` indices spread evenly over ``range(n)`` (first and last kept)."""
    if n <= cap:
        return list(range(n))
    if cap == 1:
        return [0]
    return np.linspace(0, n - 1, cap).round().astype(int).tolist()


def records_fingerprint(records) -> str:
    """sha256 of the questions and gold answers, in order."""
    data = json.dumps([[str(r["question"]), str(r["answer"])] for r in records])
    return hashlib.sha256(data.encode()).hexdigest()


# --------------------------------------------------------------------------- forced exits


class _AnswerClosed(StoppingCriteria):
    """Per row: done once the braces the exit string opened are closed (as the online decoder)."""

    def __init__(self, tokenizer, open_braces: int, batch: int, start: int):
        self.tokenizer, self.start = tokenizer, start
        self.depth, self.done = [open_braces] * batch, [False] * batch

    def __call__(self, input_ids, scores, **kwargs):
        if input_ids.shape[1] > self.start:
            for b, tok in enumerate(input_ids[:, -1].tolist()):
                if not self.done[b] and _closes(self.tokenizer, tok, self.depth, b):
                    self.done[b] = True
        return torch.tensor(self.done, device=input_ids.device)


def select_cache_rows(cache, rows: torch.Tensor):
    """A cache of ``rows`` of ``cache`` only, ``cache`` unchanged: shallow copies of the cache and of
    its layers, each then indexed (``batch_select_indices`` rebinds a layer's keys/values to the
    selected rows), so the copy is the size of the selected rows, not a deep copy of every row
    (other tensors a layer holds, such as a sliding window's position counter, are cloned)."""
    if not hasattr(cache, "layers"):  # a cache without per-layer objects: the old way
        chunk = copy.deepcopy(cache)
        chunk.batch_select_indices(rows)
        return chunk
    chunk = copy.copy(cache)
    chunk.layers = []
    for layer in cache.layers:
        own = copy.copy(layer)
        for name, value in vars(layer).items():
            if isinstance(value, torch.Tensor) and name not in ("keys", "values"):
                setattr(own, name, value.clone())
        chunk.layers.append(own)
    chunk.batch_select_indices(rows)
    return chunk


@torch.no_grad()
def forced_exit_answers(model, tokenizer, generated, prompt_len: int, events, exit_ids, *,
                        answer_max_tokens: int = 64, stop_at_answer_close: bool = True,
                        batch_size: int = 16, on_batch=None) -> list[list[int]]:
    """Greedy answers (token ids, EOS excluded) after forced exits at ``events`` = [(row, i)].

    ``generated``: the :class:`probes.early_exit.LynxGenerateOutput` of the rollouts (its cache
    and mask); event (row, i) continues ``prompt + response[:i]`` with ``exit_ids``.
    ``on_batch(n)`` is called after each batch of n events (progress bars).
    """
    cache, base_mask = generated.past_key_values, generated.attention_mask
    width = base_mask.shape[1]
    device = base_mask.device
    prefix = generated.sequences[:, :width]
    exit_t = torch.tensor(exit_ids, dtype=prefix.dtype, device=device)
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, (list, tuple)) else [eos if eos is not None else tokenizer.eos_token_id])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos)
    stop_tokens = eos | {pad}
    open_braces = tokenizer.decode(exit_ids).count("{") - tokenizer.decode(exit_ids).count("}")
    answers: list[list[int]] = []
    for start in range(0, len(events), batch_size):
        chunk = events[start:start + batch_size]
        rows = torch.tensor([b for b, _ in chunk], device=device)
        mask = base_mask[rows].clone()
        for j, (_, i) in enumerate(chunk):
            if prompt_len + i > width:
                raise ValueError(f"event {i} lies beyond the rollout cache ({width - prompt_len} response slots)")
            mask[j, prompt_len + i:] = 0  # hide the cue token and everything after it
        n = len(chunk)
        input_ids = torch.cat([prefix[rows], exit_t.expand(n, -1)], dim=1)
        mask = torch.cat([mask, mask.new_ones((n, exit_t.numel()))], dim=1)
        chunk_cache = select_cache_rows(cache, rows)
        stopping = None
        if stop_at_answer_close and open_braces > 0:
            stopping = StoppingCriteriaList([_AnswerClosed(tokenizer, open_braces, n, input_ids.shape[1])])
        out = model.generate(input_ids=input_ids, attention_mask=mask, **cache_arg(chunk_cache),
                             max_new_tokens=answer_max_tokens, do_sample=False, temperature=None, top_p=None,
                             top_k=None, eos_token_id=sorted(eos), pad_token_id=pad, stopping_criteria=stopping)
        for row in out[:, input_ids.shape[1]:].tolist():
            cut = next((k for k, t in enumerate(row) if t in stop_tokens), len(row))
            answers.append(row[:cut])
        del chunk_cache
        if on_batch is not None:
            on_batch(n)
    return answers


# --------------------------------------------------------------------------- on disk


def _write_atomic(path: Path, write) -> None:
    """``write(tmp_path)`` then rename onto ``path`` (same directory, so the rename is atomic)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json_atomic(path: Path, data: dict) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)
    _write_atomic(path, write)


def _padded(rows: list[list[int]], width: int | None = None) -> torch.Tensor:
    width = max([len(r) for r in rows] + [0]) if width is None else width
    out = torch.full((len(rows), width), -1, dtype=torch.int64)
    for k, r in enumerate(rows):
        if r:
            out[k, :len(r)] = torch.tensor(r[:width], dtype=torch.int64)
    return out


@dataclass
class EventSet:
    """Cue events: features (N, D), labels (N,) 1 = safe to exit, their problem and response index."""

    features: torch.Tensor
    labels: torch.Tensor
    problem: torch.Tensor
    event_index: torch.Tensor
    synthetic: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.numel())

    @property
    def positive_rate(self) -> float:
        return float(self.labels.float().mean().item()) if len(self) else float("nan")

    def select(self, keep: torch.Tensor) -> "EventSet":
        return EventSet(self.features[keep], self.labels[keep], self.problem[keep], self.event_index[keep],
                        self.synthetic[keep])

    def relabelled(self, rule: str, rollout_correct: dict[int, bool]) -> "EventSet":
        """The events under exit-label ``rule`` (see :data:`EXIT_LABELS`): ``forced`` keeps the forced-exit
        labels; ``no_regret`` also marks safe every event of a rollout whose own final answer is wrong
        (``rollout_correct[problem]`` False), where exiting cannot cost the answer continuing would give."""
        if rule not in EXIT_LABELS:
            raise CollectError(f"exit label rule must be one of {', '.join(EXIT_LABELS)}, got '{rule}'")
        if rule == "forced" or not len(self):
            return self
        wrong = torch.tensor([not rollout_correct[int(p)] for p in self.problem.tolist()], dtype=torch.bool)
        labels = (self.labels.bool() | wrong).to(self.labels.dtype)
        return EventSet(self.features, labels, self.problem, self.event_index, self.synthetic)


class EventShards:
    """A collection directory: ``progress.json`` + ``shard-*.safetensors``."""

    def __init__(self, directory):
        self.directory = Path(directory)
        path = self.directory / PROGRESS_FILE
        if not path.is_file():
            raise CollectError(f"no LYNX event collection at '{self.directory}' (missing {PROGRESS_FILE})")
        with open(path) as f:
            self.progress = json.load(f)

    @property
    def settings(self) -> dict:
        return self.progress["settings"]

    @property
    def complete(self) -> bool:
        return bool(self.progress.get("complete"))

    def problems(self) -> list[int]:
        """Indices of the problems whose rollouts are on disk."""
        return sorted(p for shard in self.progress["shards"].values() for p in shard["problems"])

    def _shards(self):
        for name in sorted(self.progress["shards"]):
            yield load_file(str(self.directory / name))

    def load(self, problems=None, max_per_rollout: int | None = None) -> EventSet:
        """Events of ``problems`` (all when None); ``max_per_rollout`` keeps an evenly spaced subset
        of each rollout's events (LYNX: 200 for probe training, 100 for calibration)."""
        wanted = None if problems is None else torch.tensor(sorted(set(int(p) for p in problems)), dtype=torch.int64)
        parts = []
        for shard in self._shards():
            keep = torch.ones_like(shard["problem"], dtype=torch.bool)
            if wanted is not None:
                keep &= torch.isin(shard["problem"], wanted)
            if max_per_rollout is not None:
                capped = torch.zeros_like(keep)
                for p in shard["problem"][keep].unique().tolist():
                    idx = torch.nonzero(shard["problem"] == p).flatten()
                    capped[idx[evenly_spaced(idx.numel(), max_per_rollout)]] = True
                keep &= capped
            parts.append({k: shard[k][keep] for k in ("features", "labels", "problem", "event_index", "synthetic")})
        dim = int(self.settings.get("feature_dim", 0))
        if not parts:
            return EventSet(torch.zeros((0, dim)), torch.zeros(0, dtype=torch.int8), torch.zeros(0, dtype=torch.int64),
                            torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.bool))
        cat = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        return EventSet(**cat)

    def responses(self) -> dict[int, list[int]]:
        """Each rollout's response token ids (what its events index), by problem index."""
        out = {}
        for shard in self._shards():
            for p, row, n in zip(shard["rollout_problem"].tolist(), shard["responses"], shard["response_len"].tolist()):
                out[p] = row[:n].tolist()
        return out

    def answer_lengths(self) -> dict[tuple[int, int], int]:
        """Tokens of each event's forced-exit answer, by (problem index, event index)."""
        out = {}
        for shard in self._shards():
            lengths = (shard["answer_ids"] >= 0).sum(1).tolist()
            for p, i, n in zip(shard["problem"].tolist(), shard["event_index"].tolist(), lengths):
                out[(p, i)] = int(n)
        return out

    def rollout_correct(self, tokenizer, records: list[dict]) -> dict[int, bool]:
        """Whether each rollout's own final answer is right, by problem index (``records[p]['answer']``)."""
        return {p: bool(is_correct(tokenizer.decode(ids, skip_special_tokens=True), records[p]["answer"]))
                for p, ids in self.responses().items()}

    def rollouts(self) -> dict:
        """Per rollout: problem index, response length, number of cue events (before the cap)."""
        cols = {"problem": [], "response_len": [], "num_cues": []}
        for shard in self._shards():
            for k, src in (("problem", "rollout_problem"), ("response_len", "response_len"), ("num_cues", "num_cues")):
                cols[k].append(shard[src])
        return {k: torch.cat(v) if v else torch.zeros(0, dtype=torch.int64) for k, v in cols.items()}


def _check_same(existing: dict, current: dict, directory: Path) -> None:
    for section, label in (("model", "a different model"), ("data", "other problems"), ("settings", "other settings")):
        old, new = existing.get(section, {}), current[section]
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                a, b = json.dumps(old.get(key))[:80], json.dumps(new.get(key))[:80]
                raise CollectError(f"'{directory}' holds events collected with {label} "
                                   f"({key}: {a} there, {b} now); use another data directory or delete it")


# --------------------------------------------------------------------------- collection


def _batch_seed(seed: int, batch_index: int) -> int:
    return (int(seed) * 1_000_003 + batch_index) % (2**63)


def _collect_batch(model, tokenizer, records, indices, cfg: CollectConfig, exit_ids, batch_index, forced_bar):
    """Rollouts + features + forced-exit labels for the problems ``indices``; returns shard tensors."""
    prompts = [build_prompt(tokenizer, records[p]["question"], cfg.prompt_template) for p in indices]
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False, padding_side="left")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(_batch_seed(cfg.seed, batch_index))
    out = lynx_generate(model, tokenizer, enc["input_ids"].to(device), enc["attention_mask"].to(device),
                        policy=NeverExit(cfg.layers), cue_config=cfg.cue_config, max_new_tokens=cfg.max_new_tokens,
                        do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, generator=generator,
                        record_features=True, synthetic_event_at=cfg.synthetic_event_at)
    prompt_len = enc["input_ids"].shape[1]
    events, feats, synthetic = [], [], []
    for b, stats in enumerate(out.stats):
        keep = evenly_spaced(stats.num_events, cfg.max_events_per_rollout)
        events += [(b, stats.event_indices[k]) for k in keep]
        feats.append(out.features[b][keep])
        synthetic += [stats.synthetic_event] * len(keep)
    forced_bar.total = (forced_bar.total or 0) + len(events)
    forced_bar.refresh()
    answers = forced_exit_answers(model, tokenizer, out, prompt_len, events, exit_ids,
                                  answer_max_tokens=cfg.answer_max_tokens,
                                  stop_at_answer_close=cfg.stop_at_answer_close,
                                  batch_size=cfg.forced_batch_size, on_batch=forced_bar.update)
    labels = [int(is_correct(cfg.exit_string + tokenizer.decode(a, skip_special_tokens=True),
                             records[indices[b]]["answer"])) for (b, _), a in zip(events, answers)]
    responses = [out.sequences[b, prompt_len:prompt_len + s.new_tokens].tolist() for b, s in enumerate(out.stats)]
    dim = len(cfg.layers) * model.config.hidden_size
    return {
        "features": torch.cat(feats).float().cpu() if events else torch.zeros((0, dim)),
        "labels": torch.tensor(labels, dtype=torch.int8),
        "problem": torch.tensor([indices[b] for b, _ in events], dtype=torch.int64),
        "event_index": torch.tensor([i for _, i in events], dtype=torch.int64),
        "synthetic": torch.tensor(synthetic, dtype=torch.bool),
        "answer_ids": _padded(answers, cfg.answer_max_tokens),
        "rollout_problem": torch.tensor(indices, dtype=torch.int64),
        "responses": _padded(responses),
        "response_len": torch.tensor([len(r) for r in responses], dtype=torch.int64),
        "num_cues": torch.tensor([s.num_events - int(s.synthetic_event) for s in out.stats], dtype=torch.int64),
    }


def collect_events(model, tokenizer, records, out_dir, config: CollectConfig, progress: bool = True) -> EventShards:
    """Collect (or resume collecting) the events of ``records`` into ``out_dir``; see the module doc."""
    cfg = config
    n_layers = model.config.num_hidden_layers
    if any(not 0 <= layer <= n_layers for layer in cfg.layers):
        raise CollectError(f"layers {list(cfg.layers)} out of range for a model with {n_layers} layers (0..{n_layers})")
    if not records:
        raise CollectError("no problems to collect events on")
    exit_ids = tokenizer(cfg.exit_string, add_special_tokens=False)["input_ids"]
    out_dir = Path(out_dir)
    settings = cfg.to_dict() | {"feature_dim": len(cfg.layers) * model.config.hidden_size}
    identity = base_identity(model) | {"dtype": dtype_name(next(model.parameters()).dtype)}  # features depend on both
    current = {"settings": settings, "model": identity,
               "data": {"num_problems": len(records), "fingerprint": records_fingerprint(records)}}
    progress_path = out_dir / PROGRESS_FILE
    if progress_path.is_file():
        with open(progress_path) as f:
            state = json.load(f)
        if state.get("version") != VERSION:
            raise CollectError(f"'{out_dir}' holds events of another repro-rl version (format v{state.get('version')}, "
                               f"this one writes v{VERSION}); use another data directory or delete it")
        _check_same(state, current, out_dir)
        state["shards"] = {k: v for k, v in state["shards"].items() if (out_dir / k).is_file()}
        for stale in out_dir.glob(".*.tmp"):  # left by a killed run
            stale.unlink()
    elif out_dir.exists() and any(out_dir.iterdir()):
        raise CollectError(f"'{out_dir}' exists and is not a LYNX event collection; use another data directory")
    else:
        state = {"format": FORMAT, "version": VERSION, **current, "shards": {}, "complete": False}
    out_dir.mkdir(parents=True, exist_ok=True)

    batches = [list(range(s, min(s + cfg.batch_size, len(records)))) for s in range(0, len(records), cfg.batch_size)]
    names = [f"shard-{k:05d}.safetensors" for k in range(len(batches))]
    done = [k for k, name in enumerate(names) if name in state["shards"]]
    n_events = sum(s["events"] for s in state["shards"].values())
    n_pos = sum(s["positives"] for s in state["shards"].values())
    rollout_bar = tqdm(total=len(records), initial=sum(len(batches[k]) for k in done), desc="collect: rollouts",
                       unit="problem", disable=not progress, position=0)
    forced_bar = tqdm(total=n_events, initial=n_events, desc="collect: forced exits", unit="event",
                      disable=not progress, position=1)
    try:
        for k, (indices, name) in enumerate(zip(batches, names)):
            if name in state["shards"]:
                continue
            shard = _collect_batch(model, tokenizer, records, indices, cfg, exit_ids, k, forced_bar)
            _write_atomic(out_dir / name, lambda tmp: save_file(shard, tmp, metadata={"format": FORMAT}))
            state["shards"][name] = {"problems": indices, "events": len(shard["labels"]),
                                     "positives": int(shard["labels"].sum())}
            state["complete"] = len(state["shards"]) == len(batches)
            write_json_atomic(progress_path, state)
            n_events += len(shard["labels"])
            n_pos += int(shard["labels"].sum())
            rollout_bar.update(len(indices))
            rollout_bar.set_postfix(events=n_events, positive=f"{n_pos / max(n_events, 1):.1%}")
    finally:
        rollout_bar.close()
        forced_bar.close()
    if not state["complete"]:  # every shard was already on disk
        state["complete"] = True
        write_json_atomic(progress_path, state)
    return EventShards(out_dir)


__all__ = ["EXIT_LABELS", "CollectConfig", "CollectError", "EventSet", "EventShards", "LYNX_PROMPT_TEMPLATE", "collect_events",
           "evenly_spaced", "forced_exit_answers", "write_json_atomic", "records_fingerprint", "select_cache_rows",
           "split_problems"]
