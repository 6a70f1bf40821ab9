"""The thinking-trace generator: held-out split, trace format, configurable statistics."""
from __future__ import annotations

import re

import pytest

from algos.data import DataConfigError, in_test_part, load_records
from algos.thinking_task import ThinkingTask, TraceStyle

STEP = re.compile(r"^(\d+) ([+-]) (\d+) = (\d+)\.$")


def test_held_out_split_is_disjoint_and_fixed():
    task = ThinkingTask()
    train = task.generate(3000, seed=1, split="train")
    test = task.generate(500, seed=1, split="test")
    assert {r["expression"] for r in train}.isdisjoint({r["expression"] for r in test})
    assert all(in_test_part(r["expression"], 0.3) for r in test)
    assert not any(in_test_part(r["expression"], 0.3) for r in train)
    assert len({r["expression"] for r in test}) == len(test) == 500
    # another seed draws other problems from the same partition
    assert {r["expression"] for r in task.generate(500, seed=2, split="test")} != {r["expression"] for r in test}
    assert task.generate(50, seed=1) == train[:50]  # seeded
    assert load_records("thinking", "test", 20, seed=1) == test[:20]


def _check_trace(record: dict) -> dict:
    lines = record["completion"].split("\n")
    assert lines[0] == "<think>" and lines.count("</think>") == 1 and lines.count("<think>") == 1
    end = lines.index("</think>")
    assert lines[end + 1:] == [f"The answer is \\boxed{{{record['answer']}}}."]
    assert lines[1] in (f"We need {record['expression']}.", f"That is {record['expression']}.")
    assert int(record["answer"]) == eval(record["expression"])  # digits, + and - only
    stats = {"corrections": 0, "checks": 0, "rechecks": 0}
    thinking = lines[2:end]
    i = 0
    value = int(record["expression"].split()[0])
    answer_seen = False
    while i < len(thinking):
        line = thinking[i]
        step = STEP.match(line)
        if step and not answer_seen:
            left, op, right, result = int(step[1]), step[2], int(step[3]), int(step[4])
            assert left == value
            truth = left + right if op == "+" else left - right
            assert truth >= 0  # partial results never go negative
            if result != truth:  # a slip must be caught on the next line
                assert thinking[i + 1] == f"Wait, {left} {op} {right} is {truth}, not {result}."
                stats["corrections"] += 1
                i += 1
            value = truth
        elif line.startswith("Hmm, ") and line.endswith("so that is right."):
            stats["checks"] += 1
        elif line == f"So the answer is {record['answer']}.":
            assert value == int(record["answer"])
            answer_seen = True
        elif line in ("Wait, let me check again.", "Hmm, let me double-check."):
            assert answer_seen  # re-checks come after the answer is known
            assert thinking[i + 1].endswith(f"Yes, {record['answer']}.")
            stats["rechecks"] += 1
            i += 1
        else:
            raise AssertionError(f"unexpected trace line {line!r}")
        i += 1
    assert answer_seen
    return stats


def test_traces_have_the_r1_shape_and_correct_arithmetic():
    records = ThinkingTask().generate(400, seed=3)
    stats = [_check_trace(r) for r in records]
    assert sum(s["corrections"] for s in stats) > 0 and sum(s["checks"] for s in stats) > 0
    assert any(r["word_problem"] for r in records) and not all(r["word_problem"] for r in records)
    word = next(r for r in records if r["word_problem"])
    assert word["question"].endswith("have now?") and "What is" not in word["question"]


def test_trace_statistics_follow_the_style():
    def rates(style, n=1500):
        records = ThinkingTask(style=style).generate(n, seed=5)
        stats = [_check_trace(r) for r in records]
        steps = sum(len(r["steps"]) for r in records)
        return (sum(s["corrections"] for s in stats) / steps, sum(s["checks"] for s in stats) / steps,
                sum(s["rechecks"] for s in stats) / n)

    corrections, checks, rechecks = rates(TraceStyle(correction_rate=0.3, check_rate=0.1, recheck_rate=1.5,
                                                     max_rechecks=3))
    assert corrections == pytest.approx(0.3, abs=0.03)
    assert checks == pytest.approx(0.1, abs=0.02)
    assert rechecks == pytest.approx(1.5, abs=0.08)
    assert rates(TraceStyle(correction_rate=0, check_rate=0, recheck_rate=0), n=200) == (0, 0, 0)
    assert rates(TraceStyle(recheck_rate=2, max_rechecks=2), n=100)[2] == 2


def test_traces_score_full_marks_with_the_outcome_rewards():
    from rewards.outcome import accuracy, format_reward

    records = ThinkingTask().generate(50, seed=7)
    completions = [r["completion"] for r in records]
    answers = [r["answer"] for r in records]
    assert accuracy(None, completions, answers) == [1.0] * 50
    assert format_reward(None, completions) == [1.0] * 50


def test_cues_fire_in_the_thinking_region_only():
    from probes.cues import CueDetector, cue_preset

    record = next(r for r in ThinkingTask(style=TraceStyle(recheck_rate=2, max_rechecks=2)).generate(20, seed=9))
    detector = CueDetector(cue_preset("words", thinking=True))
    text = record["completion"]
    fired = [i for i, ch in enumerate(text) if detector.push(ch)]
    assert len(fired) >= 2  # the re-checks' "Wait"/"Hmm" at least
    assert max(fired) < text.index("</think>")


@pytest.mark.parametrize("kwargs", [dict(min_operands=1), dict(min_operands=4, max_operands=3), dict(digits=0),
                                    dict(test_fraction=0.0), dict(word_problem_fraction=1.5)])
def test_bad_task_settings_are_one_clear_error(kwargs):
    with pytest.raises(DataConfigError, match="thinking task"):
        ThinkingTask(**kwargs)


@pytest.mark.parametrize("kwargs", [dict(correction_rate=-0.1), dict(check_rate=2), dict(recheck_rate=3, max_rechecks=2)])
def test_bad_style_settings_are_one_clear_error(kwargs):
    with pytest.raises(DataConfigError, match="thinking trace"):
        TraceStyle(**kwargs)
