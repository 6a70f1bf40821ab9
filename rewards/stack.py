"""Weighted combination of reward functions with TRL semantics
(``trl/trainer/grpo_trainer.py``: ``_calculate_rewards`` and the weighting after it).

Each function is called once per batch in its own convention (TRL, verl or OpenRLHF:
:mod:`rewards.adapters`) and must return B numbers or None. None (or NaN) means "not applicable":
NaN in the component tensor, skipped in the total (a NaN-sum of the weighted components). A
sample where every component is None is *unscorable* (``RewardOutput.scorable`` False): its total
is 0 and the GRPO advantage leaves it out of the group statistics and gives it 0, as TRL does.
Synchronous functions run one after another; ``async def`` ones then run concurrently on one
event loop kept in a background thread (TRL's ``async_loop``), so clients bound to it stay usable.

Extension point for token-level rewards: a function with ``token_level = True`` will
return a dict (e.g. REPRO's (B, T) token rewards). ``RewardStack._score_tokens`` is where
that goes and ``RewardOutput.token_rewards`` is where it lands; until then such functions
are rejected when the stack is built.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import numbers
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch

from .adapters import RewardInputs, call_reward, calling_convention, is_async
from .registry import RewardConfigError, _describe, resolve_reward

__all__ = ["RewardError", "RewardOutput", "RewardStack", "component_means"]

logger = logging.getLogger(__name__)


class RewardError(RuntimeError):
    """A reward function failed or returned something unusable; the message is one line."""


@dataclass
class RewardOutput:
    """Rewards for one batch of B completions."""

    total: torch.Tensor  # (B,) float32 weighted sum, NaN components skipped
    components: dict[str, torch.Tensor]  # name -> (B,) float32 unweighted, NaN = None
    token_rewards: dict[str, torch.Tensor] = field(default_factory=dict)  # future: (B, T)

    @property
    def scorable(self) -> torch.Tensor:
        """(B,) bool: some component is not None (all True without components)."""
        if not self.components:
            return torch.ones_like(self.total, dtype=torch.bool)
        return ~torch.isnan(torch.stack(list(self.components.values()))).all(dim=0)

    def means(self) -> dict[str, float]:
        """``{"rewards/<name>/mean": nanmean}`` per component (NaN if all None), for logging."""
        return {f"rewards/{k}/mean": float(torch.nanmean(v)) for k, v in self.components.items()}


def component_means(output: RewardOutput) -> dict[str, float]:
    """Logging helper, same as ``output.means()``."""
    return output.means()


def _short(value, limit: int = 80) -> str:
    text = str(value)
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def _split_specs(specs) -> list:
    if isinstance(specs, str):
        specs = specs.split(",")
    if callable(specs):
        specs = [specs]
    items = [s.strip() if isinstance(s, str) else s for s in specs]
    if not items or any(s == "" for s in items):
        raise RewardConfigError(
            f"reward specs {specs!r} contain an empty entry; use e.g. 'accuracy,format'"
        )
    return items


class RewardStack:
    """Named reward functions with weights; call it on a batch to get a :class:`RewardOutput`.

    ``specs``: list of specs (see :func:`rewards.registry.resolve_reward`), a
    comma-separated string such as ``"accuracy,format"``, or callables (named by
    ``__name__``). ``weights`` default to 1.0 each. Repeated names get "_2", "_3", ...
    A function whose signature fits no convention of :mod:`rewards.adapters` is refused here.
    """

    def __init__(self, specs: list[str] | str, weights: list[float] | None = None):
        items = _split_specs(specs)
        self.names: list[str] = []
        self.funcs: list[Callable] = []
        self.conventions: list[str] = []
        for item in items:
            if callable(item):
                name, fn = getattr(item, "__name__", type(item).__name__), item
            else:
                name, fn = resolve_reward(item)
            if getattr(fn, "token_level", False):
                raise RewardConfigError(
                    f"reward {name!r} is token-level (token_level=True), "
                    "which RewardStack does not support yet"
                )
            unique, n = name, 1
            while unique in self.names:
                n += 1
                unique = f"{name}_{n}"
            self.names.append(unique)
            self.funcs.append(fn)
            self.conventions.append(calling_convention(name, fn))
        if weights is None:
            weights = [1.0] * len(self.names)
        weights = list(weights)
        if len(weights) != len(self.names):
            raise RewardConfigError(
                f"got {len(weights)} reward weights for {len(self.names)} rewards {self.names}; "
                "give one weight per reward"
            )
        try:
            self.weights: list[float] = [float(w) for w in weights]
        except (TypeError, ValueError) as exc:
            raise RewardConfigError(
                f"reward weights {weights!r} must be numbers ({_describe(exc)})"
            ) from exc
        if not all(math.isfinite(w) for w in self.weights):
            raise RewardConfigError(f"reward weights {self.weights} must be finite")

    def __repr__(self) -> str:
        return f"RewardStack({', '.join(f'{n}*{w:g}' for n, w in zip(self.names, self.weights))})"

    def __call__(
        self,
        prompts: list,
        completions: list[str],
        completion_ids: list[list[int]] | None = None,
        *,
        prompt_texts: list[str] | None = None,
        trainer_state=None,
        **columns,
    ) -> RewardOutput:
        """Score a batch; raises :class:`RewardError` naming the reward (and sample) at fault.

        ``prompts`` in TRL's format (message lists or text, as the dataset holds them),
        ``completions`` as decoded text, ``prompt_texts`` the model's input text (OpenRLHF's
        ``prompts``), ``trainer_state`` a ``transformers.TrainerState``; dataset columns as keywords.
        """
        batch = len(completions)
        if len(prompts) != batch:
            raise ValueError(f"got {len(prompts)} prompts for {batch} completions")
        inputs = RewardInputs(list(prompts), list(completions), completion_ids, prompt_texts, columns, trainer_state)
        components = {}
        waiting = []
        for name, fn, convention in zip(self.names, self.funcs, self.conventions):
            if is_async(fn):
                waiting.append((name, fn, convention))
                continue
            try:
                result = call_reward(fn, convention, inputs)
            except RewardConfigError:
                raise
            except Exception as exc:
                raise self._locate_failure(name, fn, convention, exc, inputs) from exc
            components[name] = _to_tensor(name, result, batch)
        if waiting:
            results = _run(_gather([call_reward(fn, conv, inputs) for _, fn, conv in waiting]))
            for (name, fn, convention), result in zip(waiting, results):
                if isinstance(result, RewardConfigError):
                    raise result
                if isinstance(result, Exception):
                    raise self._locate_failure(name, fn, convention, result, inputs) from result
                components[name] = _to_tensor(name, result, batch)
        components = {name: components[name] for name in self.names}  # declared order
        if components:
            stacked = torch.stack(list(components.values()))  # (K, B)
            weights = torch.tensor(self.weights, dtype=torch.float32).unsqueeze(1)
            total = torch.nansum(stacked * weights, dim=0)
            if batch and torch.isnan(stacked).all(dim=0).any():
                logger.warning("every reward returned None for some samples; they get no advantage")
        else:
            total = torch.zeros(batch, dtype=torch.float32)
        return RewardOutput(total=total, components=components)

    # Token-level rewards (token_level=True) will get a sibling `_score_tokens` here.
    @staticmethod
    def _locate_failure(name, fn, convention, exc, inputs: RewardInputs) -> RewardError:
        """Re-run ``fn`` one sample at a time to find the first one that raises."""
        for i in range(len(inputs)):
            try:
                result = call_reward(fn, convention, inputs.select(i))
                if inspect.isawaitable(result):
                    _run(result)
            except Exception as sample_exc:
                return RewardError(
                    f"reward {name!r} raised {_describe(sample_exc)} on sample {i} "
                    f"(prompt={_short(inputs.prompt_texts[i])}, completion={_short(inputs.completions[i])})"
                )
        return RewardError(
            f"reward {name!r} raised {_describe(exc)} on the batch of {len(inputs)}; "
            "no single sample reproduces it"
        )


_LOOP: asyncio.AbstractEventLoop | None = None


def _run(coroutine):
    """Run ``coroutine`` on the rewards' background event loop (started on first use) and wait."""
    global _LOOP
    if _LOOP is None:
        _LOOP = asyncio.new_event_loop()
        threading.Thread(target=_LOOP.run_forever, name="async-rewards", daemon=True).start()
    return asyncio.run_coroutine_threadsafe(coroutine, _LOOP).result()


async def _gather(awaitables):
    return await asyncio.gather(*awaitables, return_exceptions=True)


def _to_tensor(name: str, result, batch: int) -> torch.Tensor:
    """Validate a reward function's return value: B numbers or None -> (B,) float32, None -> NaN."""
    if inspect.isawaitable(result):
        if hasattr(result, "close"):
            result.close()
        raise RewardError(f"reward {name!r} returned an awaitable from a plain def; declare it 'async def'")
    if isinstance(result, torch.Tensor):
        if result.dim() != 1:
            raise RewardError(
                f"reward {name!r} returned a tensor of shape {tuple(result.shape)}; expected ({batch},)"
            )
        result = result.detach().float().cpu().tolist()
    elif hasattr(result, "tolist") and getattr(result, "ndim", None) == 1:  # numpy array
        result = result.tolist()
    if not isinstance(result, (list, tuple)):
        raise RewardError(
            f"reward {name!r} returned {type(result).__name__}; "
            f"expected a list of {batch} floats or None"
        )
    if len(result) != batch:
        raise RewardError(f"reward {name!r} returned {len(result)} values for {batch} completions")
    values = []
    for i, v in enumerate(result):
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = v.item()
        if v is None:
            values.append(math.nan)
        elif isinstance(v, numbers.Real):
            if math.isinf(v):
                raise RewardError(
                    f"reward {name!r} returned {v} for sample {i}; rewards must be finite or None"
                )
            values.append(float(v))
        else:
            raise RewardError(
                f"reward {name!r} returned {type(v).__name__} {_short(v, 40)} for sample {i}; "
                "expected a float or None"
            )
    return torch.tensor(values, dtype=torch.float32)
