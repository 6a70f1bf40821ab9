"""Prompt datasets: the shipped GSM8K split, a seeded arithmetic task, and any HF dataset.

Every loader returns a list of records ``{"question": str, "answer": str | None, ...}`` (a TRL or
verl dataset's records also hold its ``prompt``; layouts in :mod:`algos.data_formats`); the trainer
turns a record into the model's prompt. Extra columns ride along and reach reward functions as
keyword arguments (TRL convention).
"""
from __future__ import annotations

import json
import random
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from algos.data_formats import (DEFAULT_PROMPT_TEMPLATE, DataConfigError, dataset_prompt, find_answer_column,
                                gsm8k_final_answer, prompt_column, render_prompt, to_record)

SYNTHETIC_TASKS = ("arithmetic", "thinking")  # generated here, with a held-out split of the problem space

__all__ = ["SYNTHETIC_TASKS", "DEFAULT_PROMPT_TEMPLATE", "DataConfigError", "ArithmeticTask", "gsm8k_final_answer", "load_gsm8k",
           "load_hf_dataset", "load_records", "build_prompt", "in_test_part", "draw_split_problems"]

SHIPPED_DIR = Path(__file__).parent / "datasets"
GSM8K_TRAIN = SHIPPED_DIR / "gsm8k_train.jsonl"


def in_test_part(expression: str, fraction: float = 0.3) -> bool:
    """Fixed partition of a problem space: an expression is a test problem iff
    crc32(expression) mod 1000 < 1000 * fraction. The same for every seed and machine."""
    return zlib.crc32(expression.encode()) % 1000 < int(1000 * fraction)


def draw_split_problems(draw: Callable[[], dict], n: int, split: str, test_fraction: float,
                        accept: Callable[[dict], None] | None = None) -> list[dict]:
    """Up to ``n`` problems from ``draw()`` whose ``expression`` lies in ``split`` (:func:`in_test_part`).
    Train keeps repeats; test keeps distinct expressions and stops after 5000 draws in a row find no new
    one (the test part may hold fewer than ``n``). ``accept(problem)`` runs on each kept problem in
    draw order (the thinking task writes its trace there, from the same random stream)."""
    want_test = split == "test"
    records, seen, misses = [], set(), 0
    while len(records) < n and misses < 5000:
        p = draw()
        if in_test_part(p["expression"], test_fraction) != want_test or (want_test and p["expression"] in seen):
            misses += 1
            continue
        misses = 0
        seen.add(p["expression"])
        if accept is not None:
            accept(p)
        records.append(p)
    return records


@dataclass(frozen=True)
class ArithmeticTask:
    """Seeded synthetic arithmetic: ``num_operands`` integers of ``digits`` digits joined by
    operators drawn from ``operators``. The problem space is split once by :func:`in_test_part`
    (``test_fraction`` of it is test): training problems never occur in the test split, even when
    the space is tiny (one-digit additions: 100 problems, about 30 of them test)."""

    digits: int = 2
    num_operands: int = 2
    operators: str = "+"
    test_fraction: float = 0.3

    def __post_init__(self):
        if self.digits < 1 or self.num_operands < 2:
            raise DataConfigError("arithmetic task needs digits >= 1 and num_operands >= 2")
        if not self.operators or set(self.operators) - set("+-*"):
            raise DataConfigError(f"arithmetic operators must be drawn from '+-*', got '{self.operators}'")
        if not 0 < self.test_fraction < 1:
            raise DataConfigError(f"arithmetic test fraction must be in (0, 1), got {self.test_fraction}")

    def problem(self, rng: random.Random) -> dict:
        lo, hi = 10 ** (self.digits - 1), 10 ** self.digits - 1
        if self.digits == 1:
            lo = 0
        numbers = [rng.randint(lo, hi) for _ in range(self.num_operands)]
        ops = [rng.choice(self.operators) for _ in range(self.num_operands - 1)]
        expression = str(numbers[0])
        for op, n in zip(ops, numbers[1:]):
            expression += f" {op} {n}"
        value = eval(expression, {"__builtins__": {}})  # digits and + - * only
        return {"question": f"What is {expression}?", "answer": str(value), "expression": expression}

    def generate(self, n: int, seed: int = 0, split: str = "train") -> list[dict]:
        """``n`` problems of ``split``. Train draws (with repeats) from the train part of the
        space; test returns distinct test-part problems, fewer than ``n`` when the space has fewer
        (greedy evaluation gains nothing from repeats)."""
        if split not in ("train", "test"):
            raise DataConfigError(f"arithmetic split must be 'train' or 'test', got '{split}'")
        rng = random.Random(f"arith-{split}-{seed}")
        records = draw_split_problems(lambda: self.problem(rng), n, split, self.test_fraction)
        if not records:
            raise DataConfigError(f"arithmetic task {self} has no {split} problems; use more digits or operands")
        return records


def load_gsm8k(path: Path = GSM8K_TRAIN) -> list[dict]:
    """The shipped GSM8K train split (7,473 problems, MIT licence in datasets/GSM8K_LICENSE)."""
    records = []
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            records.append({"question": row["question"], "answer": gsm8k_final_answer(row["answer"]),
                            "solution": row["answer"]})
    return records


def load_hf_dataset(name_or_path: str, split: str = "train", question_column: str = "question",
                    answer_column: str = "answer", subset: str | None = None,
                    require_answer: bool = True) -> list[dict]:
    """Any HF dataset: a hub name or a local .jsonl/.json/.parquet file, in our, TRL's or verl's
    layout (:mod:`algos.data_formats`). ``require_answer``: a dataset without a gold answer is an error."""
    import datasets

    path = Path(name_or_path)
    try:
        if path.suffix in (".jsonl", ".json", ".parquet") or path.is_file():
            if not path.exists():
                raise DataConfigError(f"dataset file '{name_or_path}' does not exist")
            kind = "parquet" if path.suffix == ".parquet" else "json"
            ds = datasets.load_dataset(kind, data_files=str(path), split="train")
        else:
            ds = datasets.load_dataset(name_or_path, subset, split=split)
    except DataConfigError:
        raise
    except Exception as exc:  # datasets raises many types; keep one line for the user
        raise DataConfigError(f"cannot load dataset '{name_or_path}': {str(exc).splitlines()[0]}") from exc
    columns = ds.column_names
    prompt_col = prompt_column(columns, question_column, name_or_path)
    answer_col = find_answer_column(columns, answer_column)
    if answer_col is None and require_answer:
        tried = "'answer', 'solution' or verl's reward_model.ground_truth" if answer_column == "answer" \
            else f"'{answer_column}'"
        raise DataConfigError(f"dataset '{name_or_path}' has no answer column ({tried}; columns: "
                              f"{', '.join(columns)}); set --answer_column, or train with rewards that need none "
                              "(no accuracy or repro) and --num_eval_samples 0")
    return [to_record(row, prompt_col, answer_col, name_or_path, i) for i, row in enumerate(ds)]


def load_records(dataset: str, split: str = "train", n: int | None = None, seed: int = 0,
                 question_column: str = "question", answer_column: str = "answer",
                 arithmetic: ArithmeticTask | None = None, require_answer: bool = True) -> list[dict]:
    """Records for ``dataset``: 'arithmetic', 'thinking' (multi-step problems with reasoning traces,
    :mod:`algos.thinking_task`), 'gsm8k', a hub name or a local file."""
    if dataset == "arithmetic":
        return (arithmetic or ArithmeticTask()).generate(n or 10_000, seed=seed, split=split)
    if dataset == "thinking":
        from algos.thinking_task import ThinkingTask
        return ThinkingTask().generate(n or 10_000, seed=seed, split=split)
    if dataset == "gsm8k":
        if split != "train":
            raise DataConfigError("the shipped gsm8k copy has only the 'train' split; "
                                  "use --dataset openai/gsm8k (network) or a local file for test")
        records = load_gsm8k()
    else:
        records = load_hf_dataset(dataset, split, question_column, answer_column, require_answer=require_answer)
    return records[:n] if n else records


def build_prompt(tokenizer, question: str, template: str = DEFAULT_PROMPT_TEMPLATE,
                 system_prompt: str | None = None, use_chat_template: bool = True) -> str:
    """The prompt text: the template filled with the question, wrapped in the chat template
    (without one, or with ``use_chat_template=False``, the filled template)."""
    chat = use_chat_template and bool(getattr(tokenizer, "chat_template", None))
    return render_prompt(tokenizer, dataset_prompt({"question": question}, template, system_prompt, chat))
