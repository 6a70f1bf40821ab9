"""How a reward function is called: TRL's, verl's or OpenRLHF's convention, told apart by signature.

- **TRL** (``trl/trainer/grpo_trainer.py``, ``GRPOTrainer._calculate_rewards``): a parameter
  ``completions`` (or only ``**kwargs``). Called once per batch as ``f(prompts=, completions=,
  completion_ids=, trainer_state=, **columns)``: prompts as the dataset holds them (message lists for
  conversational data, text for standard data), completions as ``[{"role": "assistant", "content":
  text}]`` for conversational data and text otherwise, every dataset column but ``prompt`` as a
  keyword. Returns one float or None per completion.
- **verl** (``verl/workers/reward_manager/naive.py``): a parameter ``solution_str``. Called once per
  completion as ``compute_score(data_source=, solution_str=, ground_truth=, extra_info=)`` with the
  ``data_source`` and ``extra_info`` columns (None / {} when absent) and ``reward_model["ground_truth"]``
  (else the gold ``answer``). Returns a float or a dict with a ``score`` key.
- **OpenRLHF** (``openrlhf`` ``--remote_rm_url reward_func.py``): a parameter ``queries``. Called once
  per batch as ``reward_func(queries=, prompts=, labels=)``: prompt text as the model saw it +
  completion, the prompt text, the gold ``answer`` (``--answer_column``, OpenRLHF's ``--label_key``).
  Returns rewards (tensor or list) or a dict with a ``rewards`` key.

Keywords a function does not take (and has no ``**kwargs`` for) are not passed. ``async def``
functions return a coroutine; :class:`rewards.stack.RewardStack` awaits them concurrently.
"""
from __future__ import annotations

import asyncio
import inspect
from dataclasses import dataclass, field
from typing import Callable

from .registry import RewardConfigError

__all__ = ["RewardInputs", "calling_convention", "call_reward", "is_async"]

EXPECTED = ("TRL's f(prompts, completions, **kwargs), verl's compute_score(data_source, solution_str, "
            "ground_truth, extra_info=None) or OpenRLHF's reward_func(queries, prompts, labels, **kwargs)")
_NOT_COLUMNS = ("prompt", "completion", "completion_ids")  # never passed as columns (TRL)


@dataclass
class RewardInputs:
    """One batch of B completions and everything a reward may read."""

    prompts: list  # TRL format: message lists (conversational) or strings (standard)
    completions: list[str]  # decoded completion text
    completion_ids: list[list[int]] | None = None
    prompt_texts: list[str] | None = None  # the model's input text (default: prompts, or their contents)
    columns: dict = field(default_factory=dict)  # dataset columns, per sample (length B) or shared
    trainer_state: object = None  # transformers.TrainerState from the trainer, else None

    def __post_init__(self):
        if self.prompt_texts is None:
            self.prompt_texts = [p if isinstance(p, str) else "\n".join(str(m.get("content", "")) for m in p)
                                 for p in self.prompts]
        self.columns = {k: v for k, v in self.columns.items() if k not in _NOT_COLUMNS}

    def __len__(self) -> int:
        return len(self.completions)

    @property
    def conversational(self) -> bool:
        return bool(self.prompts) and isinstance(self.prompts[0], list)

    def trl_completions(self) -> list:
        if self.conversational:
            return [[{"role": "assistant", "content": text}] for text in self.completions]
        return list(self.completions)

    def column(self, name: str, default=None) -> list:
        value = self.columns.get(name)
        return list(value) if is_column(value, len(self)) else [default] * len(self)

    def select(self, i: int) -> RewardInputs:
        """Sample ``i`` alone (per-sample columns sliced, shared ones kept)."""
        n = len(self)
        return RewardInputs(
            self.prompts[i:i + 1], self.completions[i:i + 1],
            self.completion_ids[i:i + 1] if self.completion_ids is not None else None,
            self.prompt_texts[i:i + 1],
            {k: v[i:i + 1] if is_column(v, n) else v for k, v in self.columns.items()},
            self.trainer_state)


def is_column(value, batch: int) -> bool:
    """A per-sample column (sliced per sample) rather than a shared keyword."""
    return hasattr(value, "__len__") and not isinstance(value, (str, dict)) and len(value) == batch


def is_async(fn: Callable) -> bool:
    """An ``async def`` function, or an object whose ``__call__`` is one."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))


def _parameters(fn: Callable) -> dict[str, inspect.Parameter]:
    try:
        return dict(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return {}


def calling_convention(name: str, fn: Callable) -> str:
    """'trl', 'verl' or 'openrlhf' from ``fn``'s parameters; RewardConfigError if none fits."""
    params = _parameters(fn)
    named = {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    if "solution_str" in named:
        return "verl"
    if "queries" in named:
        return "openrlhf"
    if "completions" in named or any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return "trl"
    shown = f"({', '.join(params)})" if params else "an unreadable signature"
    raise RewardConfigError(f"reward {name!r} takes {shown}; expected {EXPECTED}")


def _call(fn: Callable, **kwargs):
    """``fn(**kwargs)`` with only the keywords it takes (all of them if it has ``**kwargs``)."""
    params = _parameters(fn)
    if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        kwargs = {k: v for k, v in kwargs.items() if k in params}
    return fn(**kwargs)


def missing_arguments(fn: Callable, given) -> list[str]:
    """Required parameters of ``fn`` that ``given`` does not supply."""
    return [n for n, p in _parameters(fn).items()
            if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n not in given]


def _verl_score(result):
    return result["score"] if isinstance(result, dict) else result


def _openrlhf_rewards(result):
    return result["rewards"] if isinstance(result, dict) else result


def call_reward(fn: Callable, convention: str, inputs: RewardInputs):
    """Call ``fn`` on the batch in its convention: B scores, or a coroutine of them for async ``fn``."""
    if convention == "trl":
        given = {"prompts", "completions", "completion_ids", "trainer_state", *inputs.columns}
        missing = missing_arguments(fn, given)
        if missing:
            raise RewardConfigError(
                f"reward {getattr(fn, '__name__', fn)!r} needs the dataset column(s) {', '.join(missing)} "
                f"(columns: {', '.join(inputs.columns) or 'none'})")
        return _call(fn, prompts=inputs.prompts, completions=inputs.trl_completions(),
                     completion_ids=inputs.completion_ids, **inputs.columns, trainer_state=inputs.trainer_state)
    if convention == "openrlhf":
        result = _call(fn, queries=[p + c for p, c in zip(inputs.prompt_texts, inputs.completions)],
                       prompts=inputs.prompt_texts, labels=inputs.column("answer"))
        if inspect.isawaitable(result):
            return _then(result, _openrlhf_rewards)
        return _openrlhf_rewards(result)
    if convention == "verl":
        calls = [_call(fn, data_source=source, solution_str=text, ground_truth=truth,
                       extra_info=extra if extra is not None else {})
                 for source, text, truth, extra in zip(inputs.column("data_source"), inputs.completions,
                                                       _ground_truths(inputs), inputs.column("extra_info"))]
        if calls and inspect.isawaitable(calls[0]):
            return _verl_gather(calls)
        return [_verl_score(r) for r in calls]
    raise ValueError(f"unknown reward calling convention {convention!r}")


def _ground_truths(inputs: RewardInputs) -> list:
    answers = inputs.column("answer")
    return [rm["ground_truth"] if isinstance(rm, dict) and "ground_truth" in rm else gold
            for rm, gold in zip(inputs.column("reward_model"), answers)]


async def _then(awaitable, convert):
    return convert(await awaitable)


async def _verl_gather(calls):
    return [_verl_score(r) for r in await asyncio.gather(*calls)]
