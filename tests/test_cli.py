"""Config parsing: YAML + flags (flags win), --key=value, one-line errors, --help covers every field."""
from __future__ import annotations

import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from algos.config import ConfigError, RLConfig
from train.cli import parse_config

ROOT = Path(__file__).resolve().parents[1]


def test_yaml_then_flags_flags_win(tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("learning_rate: 3.0e-6\nnum_generations: 4\nbf16: true\nreward: accuracy,format\n")
    config = parse_config(["--config", str(cfg_file), "--learning_rate=2e-5", "--bf16", "false"],
                          prog="grpo.py", fixed={"algorithm": "grpo"})
    assert config.learning_rate == 2e-5 and config.num_generations == 4
    assert config.bf16 is False and config.reward == "accuracy,format" and config.algorithm == "grpo"


def test_sweep_style_key_equals_value():
    config = parse_config(["--beta=0.04", "--loss_type=dr_grpo", "--use_peft=true", "--max_steps=9"],
                          prog="grpo.py", fixed={"algorithm": "grpo"})
    assert (config.beta, config.loss_type, config.use_peft, config.max_steps) == (0.04, "dr_grpo", True, 9)
    assert config.kl_kind == "k3" and not config.kl_in_reward and config.agg_mode == "seq-mean-token-sum-norm"


@pytest.mark.parametrize("argv, needle", [
    (["--lerning_rate=1e-5"], "unrecognized arguments: --lerning_rate"),
    (["--loss_type=foo"], "--loss_type='foo'"),
    (["--num_generations=3"], "--num_generations=3"),
    (["--max_steps=abc"], "--max_steps"),
    (["--temperature=0"], "--temperature=0"),
    (["--reward_weights=1,2"], "--reward_weights"),
])
def test_bad_input_is_one_line_naming_the_field(capsys, argv, needle):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(argv, prog="grpo.py", fixed={"algorithm": "grpo"})
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and needle in err


def test_unknown_yaml_key_and_fixed_field(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rat: 1.0e-6\n")
    with pytest.raises(SystemExit):
        parse_config(["--config", str(bad)], prog="grpo.py", fixed={"algorithm": "grpo"})
    assert "unknown field 'learning_rat'" in capsys.readouterr().err
    fixed = tmp_path / "fixed.yaml"
    fixed.write_text("algorithm: ppo\n")
    with pytest.raises(SystemExit):
        parse_config(["--config", str(fixed)], prog="grpo.py", fixed={"algorithm": "grpo"})
    assert "fixed to 'grpo'" in capsys.readouterr().err


def test_config_validation_direct():
    with pytest.raises(ConfigError, match="num_generations"):
        RLConfig(algorithm="grpo", num_generations=1, per_device_train_batch_size=1)
    assert RLConfig(algorithm="ppo").kl_coef == 0.01 and RLConfig(algorithm="grpo").kl_coef == 0.0
    with pytest.raises(ConfigError, match="logprobs_chunk_size.*must be >= 0"):
        RLConfig(logprobs_chunk_size=-1)
    with pytest.raises(ConfigError, match="max_tokens_per_micro_batch.*must be >= 0"):
        RLConfig(max_tokens_per_micro_batch=-5)


def test_help_documents_every_field():
    out = subprocess.run([sys.executable, str(ROOT / "train" / "grpo.py"), "--help"],
                         capture_output=True, text=True, check=True).stdout
    for f in fields(RLConfig):
        if f.name != "algorithm":
            assert f"--{f.name}" in out, f.name


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_shipped_configs_parse(name):
    script = "ppo" if name.startswith("ppo") else "reinforce_pp" if name.startswith("reinforce_pp") else "grpo"
    config = parse_config(["--config", str(ROOT / "configs" / name)], prog=f"{script}.py",
                          fixed={"algorithm": script})
    assert config.algorithm == script
