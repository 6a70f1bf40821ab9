"""Reward registry and spec resolution.

A spec is a registered name ("accuracy", "format", "overlong"), ``"package.module:function"``,
``"path/to/file.py:function"``, a bare ``"path/to/file.py"`` (its ``compute_score``, verl's default
name, or ``reward_func``, OpenRLHF's), or the hub id or directory of a sequence-classification
model (:mod:`rewards.reward_model`). Every configuration problem raises
:class:`RewardConfigError` with a one-line message saying what to fix.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from typing import Callable

from .outcome import accuracy, format_reward

__all__ = ["RewardConfigError", "register_reward", "resolve_reward", "registered_rewards"]

_REGISTRY: dict[str, Callable] = {"accuracy": accuracy, "format": format_reward}
# Names that are not sequence rewards: the trainer handles them itself.
_PROCESS_REWARDS = {"repro": "REPRO is a process reward, scored on the policy by the trainer "
                             "(--reward accuracy,repro); a RewardStack holds sequence-level rewards only"}


class RewardConfigError(ValueError):
    """A reward spec or weight list that cannot be used; the message is one line."""


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {_one_line(exc)}"


def registered_rewards() -> list[str]:
    """Sorted names accepted by :func:`resolve_reward`."""
    return sorted(_REGISTRY)


def register_reward(name: str):
    """Decorator registering a reward function under ``name``.

    Re-registering the same function (e.g. after a module reload) is allowed; taking a
    name already used by a different function raises RewardConfigError.
    """
    if not isinstance(name, str) or not name.strip() or ":" in name or "," in name:
        raise RewardConfigError(f"invalid reward name {name!r}: use a name without ':' or ','")
    name = name.strip()

    def decorator(fn: Callable) -> Callable:
        if not callable(fn):
            raise RewardConfigError(f"register_reward({name!r}) got a non-callable {type(fn).__name__}")
        old = _REGISTRY.get(name)
        if old is not None and old is not fn and _qualname(old) != _qualname(fn):
            raise RewardConfigError(
                f"reward name {name!r} is already registered to {_qualname(old)}; choose another name"
            )
        _REGISTRY[name] = fn
        return fn

    return decorator


def _qualname(fn: Callable) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def _hint() -> str:
    return (
        f"registered: {', '.join(registered_rewards())}; "
        "or use 'package.module:function', 'path/to/file.py:function' or a reward model's id or directory"
    )


def _lookup_name(spec: str) -> Callable:
    if spec in _PROCESS_REWARDS:
        raise RewardConfigError(f"reward {spec!r}: {_PROCESS_REWARDS[spec]}")
    if spec not in _REGISTRY:
        raise RewardConfigError(f"unknown reward {spec!r}; {_hint()}")
    return _REGISTRY[spec]


def _is_path(target: str) -> bool:
    return target.endswith(".py") or "/" in target or os.sep in target


def _load_file(spec: str, path: str):
    full = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(full):
        raise RewardConfigError(f"reward {spec!r}: file {full} does not exist; fix the path")
    stem = os.path.splitext(os.path.basename(full))[0]
    mod_name = f"_reward_file_{stem}_{hashlib.sha1(full.encode()).hexdigest()[:10]}"
    if mod_name in sys.modules:  # each file is executed once per process
        return sys.modules[mod_name]
    mod_spec = importlib.util.spec_from_file_location(mod_name, full)
    if mod_spec is None or mod_spec.loader is None:
        raise RewardConfigError(f"reward {spec!r}: cannot load {full} as Python; use a .py file")
    module = importlib.util.module_from_spec(mod_spec)
    sys.modules[mod_name] = module
    try:
        mod_spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[mod_name]
        raise RewardConfigError(
            f"reward {spec!r}: executing {full} failed ({_describe(exc)})"
        ) from exc
    return module


def _import_module(spec: str, target: str):
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as exc:
        raise RewardConfigError(
            f"reward {spec!r}: module {target!r} not found ({_describe(exc)}); "
            "install it or put it on PYTHONPATH"
        ) from exc
    except Exception as exc:
        raise RewardConfigError(
            f"reward {spec!r}: importing {target!r} failed ({_describe(exc)})"
        ) from exc


FILE_DEFAULTS = ("compute_score", "reward_func")  # verl's and OpenRLHF's function names


def _file_default(spec: str) -> tuple[str, Callable]:
    module = _load_file(spec, spec)
    for name in FILE_DEFAULTS:
        if callable(getattr(module, name, None)):
            return name, getattr(module, name)
    raise RewardConfigError(f"reward {spec!r} defines neither {' nor '.join(FILE_DEFAULTS)}; "
                            f"name the function as '{spec}:function'")


def resolve_reward(spec: str) -> tuple[str, Callable]:
    """Return ``(name, function)`` for a spec (module docstring).

    The name is the registered name, the function's attribute name, or the reward model's last
    path part (as TRL names it).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise RewardConfigError(f"empty or non-string reward spec {spec!r}; {_hint()}")
    spec = spec.strip()
    if ":" not in spec:
        if spec.endswith(".py"):
            return _file_default(spec)
        if spec in _REGISTRY or spec in _PROCESS_REWARDS or ("/" not in spec and not os.path.isdir(spec)):
            return spec, _lookup_name(spec)
        from .reward_model import SequenceClassifierReward

        model = SequenceClassifierReward(spec)
        return model.__name__, model
    target, _, attr = spec.rpartition(":")  # rpartition keeps "C:\\dir\\f.py:fn" intact
    target, attr = target.strip(), attr.strip()
    if not target or not attr:
        raise RewardConfigError(
            f"reward spec {spec!r} must look like 'package.module:function' or 'file.py:function'"
        )
    module = _load_file(spec, target) if _is_path(target) else _import_module(spec, target)
    obj = module
    for part in attr.split("."):  # allows "module:Class.method"
        if not hasattr(obj, part):
            public = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
            raise RewardConfigError(
                f"reward {spec!r}: {target} has no attribute {attr!r}; "
                f"callables there: {', '.join(sorted(public)[:20]) or 'none'}"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise RewardConfigError(f"reward {spec!r}: {attr!r} is a {type(obj).__name__}, not a function")
    return attr.split(".")[-1], obj
