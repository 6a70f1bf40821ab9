"""TRL-style reward functions used by the trainer tests (loaded by 'path:function' specs).

Completions arrive as TRL gives them: message lists for chat prompts, text otherwise."""
import json
import os


def _text(completion):
    return completion[0]["content"] if isinstance(completion, list) else completion


def digit_count(prompts, completions, **kwargs):
    """Fraction of characters that are digits: varies across random completions."""
    return [sum(ch.isdigit() for ch in _text(c)) / max(len(_text(c)), 1) for c in completions]


def length_reward(prompts, completions, **kwargs):
    """Longer completions score higher (a signal any random model produces)."""
    return [len(_text(c)) / 100.0 for c in completions]


def slow_length_reward(prompts, completions, **kwargs):
    """length_reward after a 0.3 s wait: a reward stack whose time the step's metrics must show."""
    import time

    time.sleep(0.3)
    return length_reward(prompts, completions)


def record_rank(prompts, completions, dataset_index=None, **kwargs):
    """Records which dataset rows this process saw (for the 2-process test), scores length."""
    out_dir = os.environ.get("REPRO_TEST_RECORD_DIR")
    if out_dir:
        rank = os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))
        with open(os.path.join(out_dir, f"rank{rank}.jsonl"), "a") as f:
            f.write(json.dumps(sorted(set(dataset_index or []))) + "\n")
    return length_reward(prompts, completions)


def negative_length(prompts, completions, **kwargs):
    """Never > 0 (so full EAGER sees every group as unsolved), yet varies with length."""
    return [-len(_text(c)) / 100.0 for c in completions]


def constant_for_even_rows(prompts, completions, dataset_index=None, **kwargs):
    """All-equal rewards for prompts at even dataset rows (uninformative groups), length otherwise."""
    return [0.0 if i % 2 == 0 else len(_text(c)) / 100.0 for c, i in zip(completions, dataset_index)]


def zero_reward(prompts, completions, **kwargs):
    """The same reward for everything: no group is informative."""
    return [0.0] * len(completions)


def record_call(prompts, completions, completion_ids, trainer_state, **kwargs):
    """Writes what it was given (types, keyword names, trainer state) to REPRO_TEST_RECORD_DIR/calls.jsonl;
    scores 0."""
    with open(os.path.join(os.environ["REPRO_TEST_RECORD_DIR"], "calls.jsonl"), "a") as f:
        f.write(json.dumps({"prompt": prompts[0], "completion": completions[0], "completion_ids": completion_ids[0],
                            "keywords": sorted(kwargs), "global_step": trainer_state.global_step,
                            "max_steps": trainer_state.max_steps}) + "\n")
    return [0.0] * len(completions)


async def async_length(prompts, completions, **kwargs):
    """An async reward (as one calling an API would be): length of the completion."""
    import asyncio

    await asyncio.sleep(0.01)
    return [len(_text(c)) / 100.0 for c in completions]
