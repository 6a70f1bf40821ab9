"""Dataset layouts -> records, and records -> prompts: ours, TRL's and verl's.

A dataset row becomes a record holding every column, plus ``answer`` (the gold answer, or None)
and, for prompt datasets, ``question`` (the last user message, for the jobs that build their own
prompt: probe, router, ``scripts/evaluate.py``). The prompt comes from:

- a ``prompt`` column (TRL, ``trl/data_utils.py``; verl's parquet layout): chat messages
  (``[{"role": ..., "content": ...}]``, *conversational*) go through the tokenizer's chat template;
  text (*standard*) is the model input as is;
- otherwise the question column: ``--prompt_template`` filled with it, as one user message
  (after ``--system_prompt``) in the chat template; without a chat template, the filled text.

The gold answer is ``--answer_column``; for its default, ``answer``, the first of ``answer``,
``solution`` (TRL's examples) and ``reward_model.ground_truth`` (verl). A GSM8K ``#### 72``
solution is cut to ``72``.
"""
from __future__ import annotations

import re

DEFAULT_PROMPT_TEMPLATE = (
    "{question}\nGive the final answer as a number in \\boxed{{}}, for example \\boxed{{42}}."
)


class DataConfigError(ValueError):
    """Bad dataset settings; the message names what to fix."""


def gsm8k_final_answer(solution: str) -> str:
    """GSM8K solutions end with '#### <answer>'; commas are dropped."""
    match = re.search(r"####\s*(.+?)\s*$", solution.strip())
    if not match:
        raise DataConfigError("GSM8K record without a '#### answer' line")
    return match.group(1).replace(",", "").strip()


def _gold(value):
    if value is None:
        return None
    text = str(value)
    return gsm8k_final_answer(text) if "####" in text else text


def is_messages(value) -> bool:
    """A conversational prompt: a non-empty list of ``{"role", "content"}`` dicts (TRL's test)."""
    return (isinstance(value, list) and bool(value)
            and all(isinstance(m, dict) and "role" in m and "content" in m for m in value))


def prompt_column(columns: list[str], question_column: str, source: str) -> str:
    """``prompt`` (TRL, verl) when the dataset has it, else the question column."""
    if "prompt" in columns:
        return "prompt"
    if question_column in columns:
        return question_column
    raise DataConfigError(
        f"dataset '{source}' has neither a 'prompt' column (TRL, verl) nor a '{question_column}' column "
        f"(columns: {', '.join(columns)}); rename one, or set --question_column")


def find_answer_column(columns: list[str], wanted: str = "answer") -> str | None:
    """Where the gold answer is: ``wanted``; for the default ``answer``, else ``solution`` or verl's
    ``reward_model``; None if nowhere."""
    for name in (wanted, "solution", "reward_model") if wanted == "answer" else (wanted,):
        if name in columns:
            return name
    return None


def _last_user_text(prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m["role"] == "user"]
    return str(users[-1] if users else prompt[-1]["content"])


def to_record(row: dict, prompt_col: str, answer_col: str | None, source: str, index: int) -> dict:
    """One dataset row as a record (module docstring)."""
    record = dict(row)
    if prompt_col == "prompt":
        prompt = row["prompt"]
        if not (isinstance(prompt, str) or is_messages(prompt)):
            raise DataConfigError(
                f"dataset '{source}' row {index}: 'prompt' must be text or a list of "
                f"{{'role', 'content'}} messages, got {type(prompt).__name__}")
        record.setdefault("question", _last_user_text(prompt))
    else:
        record["question"] = str(row[prompt_col])
    gold = row.get(answer_col) if answer_col else None
    if answer_col == "reward_model":
        gold = gold.get("ground_truth") if isinstance(gold, dict) else None
    record["answer"] = _gold(gold)
    return record


def dataset_prompt(record: dict, template: str = DEFAULT_PROMPT_TEMPLATE, system_prompt: str | None = None,
                   chat: bool = True):
    """The prompt in TRL's format: the record's ``prompt``, or messages (``chat``) / text built from
    its question."""
    if "prompt" in record:
        return record["prompt"]
    try:
        content = template.format(question=record["question"])
    except (KeyError, IndexError) as exc:
        raise DataConfigError(f"prompt_template must contain only the field {{question}} "
                              f"(escape braces as {{{{ }}}}): {exc}") from exc
    if not chat:
        return content
    messages = [{"role": "user", "content": content}]
    if system_prompt:
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def render_prompt(tokenizer, prompt) -> str:
    """The model's input text: messages through the chat template (a generation prompt after a
    user or tool turn, continuing a final assistant turn, as TRL's ``apply_chat_template``), text
    as is."""
    if isinstance(prompt, str):
        return prompt
    if not getattr(tokenizer, "chat_template", None):
        raise DataConfigError("the dataset's prompts are chat messages but the tokenizer has no chat "
                              "template; use a chat model or text prompts")
    last_role = prompt[-1]["role"]
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=last_role != "assistant",
                                         continue_final_message=last_role == "assistant")
