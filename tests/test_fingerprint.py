"""algos.fingerprint: one weight fingerprint for the probe, router and bundle checks.

Same weights in fp32 and bf16 match; one Adam step at lr 1e-6 and a merged all-linear LoRA are seen;
the probe and router loaders refuse a changed model in one line and load older exports with a warning.
"""
from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM

from algos.fingerprint import FINGERPRINT_KEY, base_identity, weight_fingerprint
from probes.conformal import ConformalCalibration
from probes.cues import cue_preset, default_exit_string
from probes.export import LynxProbe, ProbeLoadError, load_probe, save_probe
from probes.probe import ExitProbe
from routers.export import load_router, save_router
from routers.router import PathRouter


@pytest.fixture(scope="module")
def model(tiny_model_path):
    return AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()


def adam_step(model, lr: float = 1e-6):
    """A copy of ``model`` after one Adam step on a next-token loss."""
    changed = copy.deepcopy(model).train()
    ids = torch.tensor([[1, 5, 9, 3, 7, 2]])
    changed(input_ids=ids, labels=ids).loss.backward()
    torch.optim.Adam(changed.parameters(), lr=lr).step()
    return changed.eval()


def save_probe_for(model, where):
    probe = ExitProbe(2 * model.config.hidden_size, (8,))
    bundle = LynxProbe(probe=probe.eval(), calibration=ConformalCalibration([0.5] * 10, [0.1] * 10), layers=(1, 2),
                       cue_config=cue_preset("words", True), exit_string=default_exit_string(True),
                       base_model=base_identity(model), calibrated_with={"dtype": "float32", "routing": False})
    return save_probe(where, bundle)


def test_fp32_and_bf16_copies_match_fp16_does_not(model, tiny_model_path):
    fp = weight_fingerprint(model)
    assert len(fp) == 16
    assert weight_fingerprint(copy.deepcopy(model).to(torch.bfloat16)) == fp
    assert weight_fingerprint(AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.bfloat16)) == fp
    assert weight_fingerprint(copy.deepcopy(model).to(torch.float16)) != fp  # rounded twice: documented


def test_one_adam_step_at_lr_1e6_is_seen(model):
    changed = adam_step(model)
    moved = max((a - b).abs().max().item() for a, b in zip(changed.parameters(), model.parameters()))
    assert 0 < moved < 1e-5  # a tiny update ...
    assert weight_fingerprint(changed) != weight_fingerprint(model)  # ... is seen
    assert weight_fingerprint(changed.to(torch.bfloat16)) != weight_fingerprint(model)


def test_merged_all_linear_lora_is_seen(model):
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(copy.deepcopy(model), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    peft = adam_step(peft)  # B starts at zero: one small step makes the LoRA delta non-zero
    merged = peft.merge_and_unload()
    assert sorted(merged.state_dict()) == sorted(model.state_dict())  # same names and shapes
    assert torch.equal(merged.model.norm.weight, model.model.norm.weight)  # norms and embeddings untouched
    assert torch.equal(merged.model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert weight_fingerprint(merged) != weight_fingerprint(model)


def test_probe_and_router_loaders_refuse_changed_weights_in_one_line(model, tmp_path):
    probe_dir = save_probe_for(model, tmp_path / "lynx")
    router_dir = save_router(PathRouter(2, model.config.hidden_size), tmp_path / "router", model)
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    load_probe(probe_dir, bf16)  # the same weights in another dtype
    load_router(router_dir, bf16)
    changed = adam_step(model)
    with pytest.raises(ProbeLoadError, match="weights fingerprint") as probe_err:
        load_probe(probe_dir, changed)
    with pytest.raises(ValueError, match="weights fingerprint") as router_err:
        load_router(router_dir, changed)
    for err in (probe_err, router_err):
        assert "\n" not in str(err.value) and "load it with the model it was trained on" in str(err.value)
    with pytest.raises(ProbeLoadError, match="load the model in float32 or bfloat16"):
        load_probe(probe_dir, copy.deepcopy(model).to(torch.float16))


def test_older_exports_load_with_a_warning(model, tmp_path):
    probe_dir = save_probe_for(model, tmp_path / "lynx")
    router_dir = save_router(PathRouter(2, model.config.hidden_size), tmp_path / "router", model)
    for path in (probe_dir / "lynx_probe.json", router_dir / "router.json"):
        meta = json.loads(path.read_text())
        del meta["base_model"][FINGERPRINT_KEY]
        meta["version"] = 1
        path.write_text(json.dumps(meta))
    changed = adam_step(model)
    with pytest.warns(UserWarning, match="records no weights fingerprint"):
        load_probe(probe_dir, changed)
    with pytest.warns(UserWarning, match="records no weights fingerprint"):
        load_router(router_dir, changed)


def test_no_warning_for_current_exports(model, tmp_path):
    probe_dir = save_probe_for(model, tmp_path / "lynx")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_probe(probe_dir, model)


@pytest.mark.cuda
def test_cuda_fingerprint_equals_cpu(model):
    fp = weight_fingerprint(model)
    assert weight_fingerprint(copy.deepcopy(model).cuda()) == fp
    assert weight_fingerprint(copy.deepcopy(model).to("cuda", torch.bfloat16)) == fp
