"""TRL-style reward functions used by the trainer tests (loaded by 'path:function' specs)."""
import json
import os


def digit_count(prompts, completions, **kwargs):
    """Fraction of characters that are digits: varies across random completions."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def length_reward(prompts, completions, **kwargs):
    """Longer completions score higher (a signal any random model produces)."""
    return [len(c) / 100.0 for c in completions]


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
    return [-len(c) / 100.0 for c in completions]


def constant_for_even_rows(prompts, completions, dataset_index=None, **kwargs):
    """All-equal rewards for prompts at even dataset rows (uninformative groups), length otherwise."""
    return [0.0 if i % 2 == 0 else len(c) / 100.0 for c, i in zip(completions, dataset_index)]


def zero_reward(prompts, completions, **kwargs):
    """The same reward for everything: no group is informative."""
    return [0.0] * len(completions)
