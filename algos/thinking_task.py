"""The thinking task: seeded multi-step problems with R1-style reasoning traces.

A problem is a chain of 3-4 one-digit numbers joined by + and - (the default; a 135M model adds
one-digit numbers reliably and two-digit ones about half the time), asked bare ("What is 8 + 7 - 5 + 6?")
or as a templated word problem. Its trace has the shape R1-style models write::

    <think>
    We need 8 + 7 - 5 + 6.
    8 + 7 = 15.
    15 - 5 = 10.
    10 + 6 = 17.
    Wait, 10 + 6 is 16, not 17.          <- a wrong step, caught and corrected
    Hmm, 16 - 6 = 10, so that is right.  <- a check with a cue word
    So the answer is 16.
    Wait, let me check again.            <- redundant re-checking after the answer is known
    8 + 7 = 15. 15 - 5 = 10. 10 + 6 = 16. Yes, 16.
    </think>
    The answer is \\boxed{16}.

That shape is what the project's methods act on: LYNX exits at the "wait"/"hmm" cues once the
answer is known (the re-checks are the tokens it saves), EAGER branches where steps are uncertain,
REPRO scores one line per step, and the Dr.LLM router sees easy and hard steps.

:class:`TraceStyle` sets the trace statistics; the held-out split is a fixed partition of the
expression space (:func:`algos.data.in_test_part`), so a word problem and its bare form share a split.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from algos.data import draw_split_problems
from algos.data_formats import DataConfigError

THINK_START, THINK_END = "<think>", "</think>"

_NAMES = ("Ava", "Ben", "Chloe", "Dan", "Emma", "Finn", "Grace", "Hugo", "Iris", "Jack", "Lena", "Max")
_ITEMS = ("apples", "marbles", "stickers", "coins", "books", "cards", "shells", "pencils")
_GAIN = ("gets {n} more", "finds {n} more", "is given {n} more", "buys {n} more")
_LOSS = ("gives away {n}", "loses {n}", "uses {n}", "sells {n}")


@dataclass(frozen=True)
class TraceStyle:
    """How a trace thinks. Rates are per trace or per step, as named.

    - ``correction_rate``: chance that a step is first written with a wrong result, then caught
      with "Wait, ... is X, not Y." and continued from the right value.
    - ``check_rate``: chance that a step is followed by a check with a cue ("Hmm, X - b = a, so that is right.").
    - ``recheck_rate``: expected number of redundant re-checks of the whole chain after
      "So the answer is ...", each "Wait, let me check again." plus the steps in one line
      (the count is Binomial(``max_rechecks``, ``recheck_rate / max_rechecks``)).
    - ``max_rechecks``: at most this many re-checks.
    """

    correction_rate: float = 0.2
    check_rate: float = 0.25
    recheck_rate: float = 1.0
    max_rechecks: int = 2

    def __post_init__(self):
        for name in ("correction_rate", "check_rate"):
            if not 0 <= getattr(self, name) <= 1:
                raise DataConfigError(f"thinking trace {name} must be in [0, 1], got {getattr(self, name)}")
        if self.max_rechecks < 0 or not 0 <= self.recheck_rate <= self.max_rechecks:
            raise DataConfigError(f"thinking trace recheck_rate must be in [0, max_rechecks={self.max_rechecks}], "
                                  f"got {self.recheck_rate}")


@dataclass(frozen=True)
class ThinkingTask:
    """Seeded multi-step problems: ``min_operands``..``max_operands`` integers of up to ``digits``
    digits joined by + and - (every partial result stays >= 0), a ``word_problem_fraction`` of them
    as word problems. ``test_fraction`` of the expression space is held out."""

    min_operands: int = 3
    max_operands: int = 4
    digits: int = 1
    word_problem_fraction: float = 0.3
    test_fraction: float = 0.3
    style: TraceStyle = field(default_factory=TraceStyle)

    def __post_init__(self):
        if not 2 <= self.min_operands <= self.max_operands:
            raise DataConfigError("thinking task needs 2 <= min_operands <= max_operands")
        if self.digits < 1:
            raise DataConfigError("thinking task needs digits >= 1")
        for name in ("word_problem_fraction", "test_fraction"):
            value = getattr(self, name)
            if not 0 <= value <= 1 or (name == "test_fraction" and value in (0, 1)):
                raise DataConfigError(f"thinking task {name} must be in [0, 1] (test_fraction in (0, 1)), got {value}")

    # -- problems ---------------------------------------------------------------------------------
    def problem(self, rng: random.Random) -> dict:
        """One problem: its expression, the running values, and the question text."""
        hi = 10 ** self.digits - 1
        lo = 1 if self.digits == 1 else 10 ** (self.digits - 1)
        count = rng.randint(self.min_operands, self.max_operands)
        values = [rng.randint(lo, hi)]
        steps = []  # (left, op, right, result)
        for _ in range(count - 1):
            left = values[-1]
            op = "-" if left >= lo and rng.random() < 0.5 else "+"
            right = rng.randint(lo, min(hi, left)) if op == "-" else rng.randint(lo, hi)
            result = left - right if op == "-" else left + right
            steps.append((left, op, right, result))
            values.append(result)
        expression = str(values[0]) + "".join(f" {op} {right}" for _, op, right, _ in steps)
        word = rng.random() < self.word_problem_fraction
        question = self._word_question(values[0], steps, rng) if word else f"What is {expression}?"
        return {"question": question, "answer": str(values[-1]), "expression": expression,
                "steps": steps, "word_problem": word}

    @staticmethod
    def _word_question(start: int, steps, rng: random.Random) -> str:
        name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
        actions = [rng.choice(_GAIN if op == "+" else _LOSS).format(n=right) for _, op, right, _ in steps]
        middle = ", then ".join(actions[:-1]) + (", and then " if len(actions) > 1 else "") + actions[-1]
        return f"{name} has {start} {item}. {name} {middle}. How many {item} does {name} have now?"

    def generate(self, n: int, seed: int = 0, split: str = "train") -> list[dict]:
        """``n`` problems of ``split`` with their traces (``completion``). Train draws with repeats
        from the train part of the expression space; test returns distinct test-part expressions."""
        if split not in ("train", "test"):
            raise DataConfigError(f"thinking task split must be 'train' or 'test', got '{split}'")
        rng = random.Random(f"thinking-{split}-{seed}")

        def add_trace(p: dict) -> None:
            p["completion"] = self.trace(p, rng)

        records = draw_split_problems(lambda: self.problem(rng), n, split, self.test_fraction, accept=add_trace)
        if not records:
            raise DataConfigError(f"thinking task {self} has no {split} problems; use more digits or operands")
        return records

    # -- traces -----------------------------------------------------------------------------------
    def trace(self, problem: dict, rng: random.Random) -> str:
        """The reasoning trace and answer for ``problem`` (format in the module docstring)."""
        style, steps = self.style, problem["steps"]
        opening = "That is" if problem["word_problem"] else "We need"
        lines = [THINK_START, f"{opening} {problem['expression']}."]
        for left, op, right, result in steps:
            if rng.random() < style.correction_rate:
                wrong = _slip(result, rng)
                lines += [f"{left} {op} {right} = {wrong}.", f"Wait, {left} {op} {right} is {result}, not {wrong}."]
            else:
                lines.append(f"{left} {op} {right} = {result}.")
            if rng.random() < style.check_rate:
                back = "-" if op == "+" else "+"
                lines.append(f"Hmm, {result} {back} {right} = {left}, so that is right.")
        answer = steps[-1][3]
        lines.append(f"So the answer is {answer}.")
        chain = " ".join(f"{left} {op} {right} = {result}." for left, op, right, result in steps)
        rechecks = sum(rng.random() < style.recheck_rate / style.max_rechecks for _ in range(style.max_rechecks))
        for _ in range(rechecks):
            lines += [rng.choice(("Wait, let me check again.", "Hmm, let me double-check.")),
                      f"{chain} Yes, {answer}."]
        lines.append(THINK_END)
        return "\n".join(lines) + f"\nThe answer is \\boxed{{{answer}}}."


def _slip(value: int, rng: random.Random) -> int:
    """A plausible wrong result: off by 10 or by 1 to 3 (never the value itself, never negative)."""
    delta = rng.choice((-10, 10, -1, 1, -2, 2, 3))
    wrong = value + delta
    return wrong if wrong >= 0 and wrong != value else value + 10
