"""Layer dropout while fine-tuning (algos/layer_dropout.py): the rate schedules by hand, skipped blocks are the
identity in training mode only, draws are seeded, and the model is restored on exit."""
from __future__ import annotations

import json
import math

import pytest
import torch


def _tiny(tmp_path, layers=3):
    from algos.models import load_causal_lm
    from tests.conftest import make_tiny_model

    return load_causal_lm(str(make_tiny_model(tmp_path / "tiny", num_hidden_layers=layers)), dtype=torch.float32)


def test_rates_by_hand():
    from algos.config import ConfigError
    from algos.layer_dropout import layer_dropout_rates, parse_blocks

    assert layer_dropout_rates(0.1, 4) == [0.1] * 4
    # exponential: p * (2^(l/(L-1)) - 1) for L = 3, p = 0.2 -> 0, 0.2 * (sqrt(2) - 1), 0.2
    got = layer_dropout_rates(0.2, 3, "exponential")
    assert got[0] == 0.0 and math.isclose(got[1], 0.2 * (math.sqrt(2) - 1)) and math.isclose(got[2], 0.2)
    for bad in (-0.1, 1.0):
        with pytest.raises(ConfigError, match="rate must be in"):
            layer_dropout_rates(bad, 3)
    with pytest.raises(ConfigError, match="schedule must be one of"):
        layer_dropout_rates(0.1, 3, "linear")
    assert parse_blocks("3-5, 8,4") == [3, 4, 5, 8] and parse_blocks("") == []
    assert layer_dropout_rates(0.1, 6, blocks="1-2,4") == [0.0, 0.1, 0.1, 0.0, 0.1, 0.0]
    for bad in ("3-", "a", "5-3", "-1"):
        with pytest.raises(ConfigError, match="must look like '3-7,25'"):
            parse_blocks(bad)
    with pytest.raises(ConfigError, match="block 6 does not exist: the model has 6 blocks"):
        layer_dropout_rates(0.1, 6, blocks="2-6")


def test_dropped_blocks_are_the_identity_in_training_only_and_restored_on_exit(tmp_path):
    from algos.layer_dropout import layer_dropout

    model = _tiny(tmp_path)
    ids = torch.tensor([[5, 9, 11, 3]])
    model.eval()
    with torch.no_grad():
        dense = model(ids).logits
        embedded_only = model.lm_head(model.model.norm(model.model.embed_tokens(ids)))
    keys = set(model.state_dict())
    with layer_dropout(model, 0.999999, seed=0) as rates:
        assert rates == [0.999999] * 3
        with torch.no_grad():
            assert torch.equal(model(ids).logits, dense)            # eval mode: every block runs
            model.train()
            assert torch.allclose(model(ids).logits, embedded_only)  # training: every block skipped
    with torch.no_grad():
        assert torch.equal(model(ids).logits, dense)                # restored (dropout off in this tiny config)
    assert set(model.state_dict()) == keys and all("forward" not in vars(l) for l in model.model.layers)


def test_draws_are_seeded_and_a_rate_of_zero_changes_nothing(tmp_path):
    from algos.layer_dropout import layer_dropout

    model = _tiny(tmp_path, layers=6)
    model.train()
    ids = torch.tensor([[5, 9, 11, 3]])

    def outputs(rate, seed):
        with layer_dropout(model, rate, seed=seed), torch.no_grad():
            return [model(ids).logits for _ in range(4)]

    with torch.no_grad():
        dense = model(ids).logits
    first, again, other = outputs(0.5, 1), outputs(0.5, 1), outputs(0.5, 2)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert any(not torch.equal(a, b) for a, b in zip(first, other))
    assert any(not torch.allclose(a, dense) for a in first)  # some block was skipped
    assert all(torch.equal(a, dense) for a in outputs(0.0, 1))


@pytest.mark.parametrize("flags, message", [
    (["--layer_dropout", "1.5"], "--layer_dropout must be in [0, 1), got 1.5"),
    (["--layer_dropout_blocks", "7-3"], "--layer_dropout_blocks: layer dropout blocks must look like '3-7,25'"),
])
def test_sft_flags_reject_bad_values_in_one_line(flags, message):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "train/sft.py", *flags], cwd=root, capture_output=True, text=True)
    assert done.returncode == 2 and message in done.stderr.splitlines()[-1]


def test_sft_refuses_a_block_the_model_lacks_before_writing(tmp_path, tiny_model_path):
    from algos.config import ConfigError
    from algos.sft import SFTJobConfig, run_sft

    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="block 5 does not exist: the model has 2 blocks"):
        run_sft(SFTJobConfig(model_name_or_path=tiny_model_path, output_dir=str(out), num_train_samples=8,
                             layer_dropout=0.1, layer_dropout_blocks="5", progress=False))
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_sft_with_layer_dropout_leaves_an_always_dropped_block_untouched(tmp_path, tiny_model_path):
    """A real SFTTrainer run: block 1, dropped at every step, gets no gradient; block 0 trains; the saved model
    has the usual keys and the recipe records the dropout."""
    from algos.models import load_causal_lm
    from algos.sft import SFTJobConfig, run_sft

    out = run_sft(SFTJobConfig(model_name_or_path=tiny_model_path, output_dir=str(tmp_path / "sft"),
                               num_train_samples=8, per_device_train_batch_size=4, max_length=256, bf16=False,
                               learning_rate=1e-2, progress=False, layer_dropout=0.999999, layer_dropout_blocks="1"))
    tuned, base = load_causal_lm(str(out)), load_causal_lm(tiny_model_path)
    block = lambda model, i: torch.cat([p.flatten() for p in model.model.layers[i].parameters()])  # noqa: E731
    assert torch.equal(block(tuned, 1), block(base, 1))
    assert not torch.equal(block(tuned, 0), block(base, 0))
    assert set(tuned.state_dict()) == set(base.state_dict())
    recipe = json.loads((out / "sft_recipe.json").read_text())
    assert recipe["layer_dropout"] == 0.999999 and recipe["layer_dropout_blocks"] == "1"
