"""W&B sweep files: they parse, and the command line an agent builds for a sampled point (W&B's own
``create_sweep_command_args``, ``--key=value`` flags) parses into a config holding those values."""
from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import yaml
from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

from train.cli import parse_config

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = sorted((ROOT / "configs" / "sweeps").glob("*.yaml"))


def sample(spec: dict, rng: random.Random):
    """One value of a W&B parameter spec (the distributions our sweep files use)."""
    if "value" in spec:
        return spec["value"]
    if "values" in spec:
        return rng.choice(spec["values"])
    kind = spec.get("distribution", "uniform")
    lo, hi = spec["min"], spec["max"]
    if kind == "int_uniform":
        return rng.randint(lo, hi)
    if kind == "uniform":
        return rng.uniform(lo, hi)
    if kind == "log_uniform_values":
        return math.exp(rng.uniform(math.log(lo), math.log(hi)))
    raise AssertionError(f"sweep uses a distribution this test does not know: {kind}")


def agent_argv(sweep: dict, point: dict) -> list[str]:
    """The agent's command with ${env} dropped and ${args} expanded as W&B expands it."""
    args = create_sweep_command_args({"args": {k: {"value": v} for k, v in point.items()}})["args"]
    argv = []
    for part in sweep["command"]:
        if part == "${env}":
            continue
        argv.extend(args if part == "${args}" else [sweep["program"] if part == "${program}" else part])
    return argv


def test_there_are_sweeps_for_grpo_and_ppo():
    assert {p.name for p in SWEEPS} >= {"grpo_repro.yaml", "ppo_repro.yaml"}


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sampled_point_reaches_the_config(path, seed, monkeypatch):
    sweep = yaml.safe_load(path.read_text())
    assert sweep["method"] in ("grid", "random", "bayes") and sweep["metric"]["name"]
    point = {name: sample(spec, random.Random(seed)) for name, spec in sweep["parameters"].items()}
    argv = agent_argv(sweep, point)
    assert argv[:2] == ["accelerate", "launch"] and (ROOT / argv[2]).exists()
    script_args = argv[3:]
    config_file = script_args[script_args.index("--config") + 1]
    assert (ROOT / config_file).exists()
    monkeypatch.chdir(ROOT)
    algorithm = Path(argv[2]).stem
    config = parse_config(script_args, prog=Path(argv[2]).name, fixed={"algorithm": algorithm})
    for name, value in point.items():
        got = getattr(config, name)
        if isinstance(value, float):
            assert got == pytest.approx(value, rel=1e-9), name
        else:
            assert got == value, name
