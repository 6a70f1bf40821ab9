"""Built-in outcome rewards with the TRL signature ``f(prompts, completions, **kwargs)``.

Completions are strings; a conversational completion (a list of ``{"role", "content"}``
messages) is reduced to its last message's content. Dataset columns arrive as kwargs
lists; extra kwargs (``completion_ids``, ``trainer_state``, ...) are ignored.
"""

from __future__ import annotations

from .verify import _box_spans, is_correct

__all__ = ["accuracy", "format_reward", "completion_text"]

FORMAT_TAIL_CHARS = 20  # at most this much (stripped) text may follow the box


def completion_text(completion) -> str:
    """Plain text of a completion: the string itself, or the last message's content."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, (list, tuple)) and completion:
        last = completion[-1]
        if isinstance(last, dict):
            return str(last.get("content", ""))
    return "" if completion is None else str(completion)


def accuracy(prompts, completions, answer, **kwargs) -> list[float | None]:
    """1.0 if the last ``\\boxed{}`` answer equals the gold ``answer`` column, else 0.0.

    A missing gold answer (None) gives None ("not applicable"). See ``rewards.verify``.
    """
    return [
        None if gold is None else float(is_correct(completion_text(c), gold))
        for c, gold in zip(completions, answer, strict=True)
    ]


def _format_score(text: str) -> float:
    spans = _box_spans(text)
    if not any(text[start:end].strip() for start, end in spans):
        return 0.0  # no box, or only empty ones: nothing answered
    if len(spans) == 1:
        start, end = spans[0]
        if len(text[end + 1 :].strip()) <= FORMAT_TAIL_CHARS:
            return 1.0
    return 0.5


def format_reward(prompts, completions, **kwargs) -> list[float]:
    """Score the answer format of each completion.

    Rule: 1.0 if there is exactly one complete ``\\boxed{...}`` (or ``\\fbox{...}``; nested
    boxes count separately), its content is not blank, and the text after its closing
    brace is at most 20 characters once stripped of surrounding whitespace (room for
    "$.", "\\]", "</think>", "<|im_end|>"); 0.5 if there is a box with content but the rule
    fails (several boxes, or too much text after it); 0.0 without a box or with empty boxes
    only (an empty ``\\boxed{}`` answers nothing).
    """
    return [_format_score(completion_text(c)) for c in completions]
