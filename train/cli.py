"""Command line and YAML plumbing shared by the entry points.

Precedence: dataclass defaults < ``--config file.yaml`` < command-line flags. Flags take both
``--key value`` and ``--key=value`` (what W&B sweep agents pass). A bad flag or value stops
with one line naming it.
"""
from __future__ import annotations

import argparse
import gc
import sys
from dataclasses import MISSING, fields
from typing import get_type_hints

import yaml

from algos.config import ConfigError, RLConfig


def _parse_bool(text: str) -> bool:
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "y", "on"):
        return True
    if lowered in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got '{text}'")


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser(prog: str, description: str, fixed: dict) -> argparse.ArgumentParser:
    parser = _OneLineParser(prog=prog, description=description, allow_abbrev=False,
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML file of field: value pairs; flags override it.")
    hints = get_type_hints(RLConfig)
    for f in fields(RLConfig):
        if f.name in fixed:
            continue
        kind = hints[f.name]
        kwargs = {"default": argparse.SUPPRESS, "help": f.metadata["help"] + f" (default: {f.default!r})"}
        if kind is bool:
            kwargs.update(nargs="?", const=True, type=_parse_bool, metavar="BOOL")
        else:
            kwargs["type"] = kind
        parser.add_argument(f"--{f.name}", **kwargs)
    return parser


def _coerce(name: str, value, kind):
    if value is None:
        raise ConfigError(f"invalid {name}: empty value in the YAML config")
    try:
        if kind is bool:
            return value if isinstance(value, bool) else _parse_bool(value)
        if kind is float and isinstance(value, str):
            return float(value)
        if kind is int and isinstance(value, float) and value.is_integer():
            return int(value)
        if not isinstance(value, kind):
            return kind(value)
        return value
    except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
        raise ConfigError(f"invalid {name}: {value!r} is not a {kind.__name__}") from exc


def load_yaml(path: str) -> dict:
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file '{path}' does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file '{path}' is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must be a mapping of field: value")
    return data


def config_from_sources(yaml_values: dict, cli_values: dict, fixed: dict) -> RLConfig:
    """Merge YAML and CLI values over the defaults and build a validated config."""
    hints = get_type_hints(RLConfig)
    known = {f.name for f in fields(RLConfig)}
    merged = {}
    for source, values in (("config file", yaml_values), ("command line", cli_values)):
        for key, value in values.items():
            name = key.replace("-", "_")
            if name not in known:
                raise ConfigError(f"unknown field '{key}' in the {source} (see --help for the fields)")
            if name in fixed and value != fixed[name]:
                raise ConfigError(f"field '{name}' is fixed to {fixed[name]!r} by this script")
            merged[name] = _coerce(name, value, hints[name])
    merged.update(fixed)
    return RLConfig(**merged)


def parse_config(argv: list[str] | None = None, prog: str = "train", description: str = "",
                 fixed: dict | None = None) -> RLConfig:
    """Parse ``argv`` into a validated :class:`RLConfig`; exits with one line on bad input."""
    fixed = fixed or {}
    parser = build_parser(prog, description, fixed)
    args = vars(parser.parse_args(argv))
    config_path = args.pop("config")
    try:
        yaml_values = load_yaml(config_path) if config_path else {}
        return config_from_sources(yaml_values, args, fixed)
    except ConfigError as exc:
        parser.exit(2, f"{prog}: error: {exc}\n")


def default_field_values() -> dict:
    return {f.name: f.default for f in fields(RLConfig) if f.default is not MISSING}


def main_guard(run, errors: tuple[type[BaseException], ...] = ()):
    """Run an entry point, turning user-caused errors (the framework's, plus the entry point's own
    ``errors``) into one line and exit code 2."""
    from algos.checkpoint import CheckpointError
    from algos.data import DataConfigError
    from algos.device import DeviceError
    from algos.models import ModelLoadError

    from algos.rollout.vllm_engine import VLLMSetupError

    user_errors = (CheckpointError, ConfigError, DataConfigError, DeviceError, ModelLoadError, VLLMSetupError, *errors)
    try:
        from rewards import RewardConfigError, RewardError
        user_errors += (RewardConfigError, RewardError)
    except ImportError:
        pass
    try:
        result = run()
    except user_errors as exc:
        print(f"error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        sys.exit(2)
    close_process_group()
    return result


def close_process_group() -> None:
    """Leave a multi-process run cleanly: wait for every process, free what the run left in reference
    cycles (a DDP wrapper keeps the gloo group and its worker threads alive), then destroy the process
    group. A gloo thread that outlives the interpreter's finalization aborts the process with
    "terminate called without an active exception" (pytorch/pytorch PR 179291 describes the cause)."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch is a dependency
        return
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        gc.collect()
        # A colocated vLLM engine holds groups of its own; its exit hook would destroy them after
        # the default group is gone ("Invalid process group specified"), so they go first.
        vllm_groups = sys.modules.get("vllm.distributed.parallel_state")
        if vllm_groups is not None:
            vllm_groups.destroy_model_parallel()
            vllm_groups.destroy_distributed_environment()
        if dist.is_initialized():
            dist.destroy_process_group()
