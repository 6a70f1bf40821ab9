"""scripts/export.py: bundle round trip, parts for another model refused, tampering detected."""
from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import make_tiny_model
from probes.conformal import ConformalCalibration
from probes.cues import cue_preset, default_exit_string
from probes.export import LynxProbe, load_probe, save_probe
from probes.probe import ExitProbe
from routers.export import load_router, save_router
from routers.router import PathRouter
from script_loader import load_script

export = load_script("scripts/export.py")
SCRIPT = Path(export.__file__)  # the same script, run as a command by the CLI tests


def save_parts(model, where: Path) -> tuple[Path, Path]:
    from algos.fingerprint import base_identity

    torch.manual_seed(0)
    probe = ExitProbe(2 * model.config.hidden_size, (16, 8))
    probe.set_standardisation(torch.randn(20, probe.input_dim))
    bundle = LynxProbe(probe=probe.eval(), calibration=ConformalCalibration.from_probs(torch.rand(40), torch.arange(40) % 2),
                       layers=(1, 2), cue_config=cue_preset("words", True), exit_string=default_exit_string(True),
                       base_model=base_identity(model), default_confidence=0.9)
    probe_dir = save_probe(where / "lynx", bundle)
    router_dir = save_router(PathRouter(model.config.num_hidden_layers, model.config.hidden_size), where / "router", model)
    return probe_dir, router_dir


def test_bundle_round_trip(tiny_model_path, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    probe_dir, router_dir = save_parts(model, tmp_path)
    out = export.export_bundle(tiny_model_path, tmp_path / "bundle", probe_dir, router_dir)
    manifest = export.verify_bundle(out)
    assert manifest["parts"] == {"model": "model", "probe": "probe", "router": "router", "adapter": None}
    assert "model/model.safetensors" in manifest["files"] and manifest["versions"]["torch"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "lynx", "router"]  # no temp dirs
    reloaded = AutoModelForCausalLM.from_pretrained(out / "model")
    ids = torch.tensor([[1, 5, 9, 3]])
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)
    load_router(out / "router", reloaded)                      # same weights: fingerprint matches
    load_probe(out / "probe", reloaded, check_name=False)      # same structure under the new path


def test_parts_for_another_model_are_refused(tiny_model_path, tmp_path):
    other = AutoModelForCausalLM.from_pretrained(make_tiny_model(tmp_path / "other", seed=1))
    _, router_dir = save_parts(other, tmp_path / "parts")
    with pytest.raises(export.BundleError, match="router"):
        export.export_bundle(tiny_model_path, tmp_path / "bundle", router=router_dir)
    assert not (tmp_path / "bundle").exists() and not list(tmp_path.glob(".bundle*"))


def test_probe_for_changed_weights_is_refused(tiny_model_path, tmp_path):
    """Same architecture and name, weights one Adam step (lr 1e-6) away: the probe's fingerprint differs."""
    from algos.fingerprint import FINGERPRINT_KEY, weight_fingerprint

    changed = AutoModelForCausalLM.from_pretrained(tiny_model_path).train()
    ids = torch.tensor([[1, 5, 9, 3]])
    changed(input_ids=ids, labels=ids).loss.backward()
    torch.optim.Adam(changed.parameters(), lr=1e-6).step()
    probe_dir, _ = save_parts(changed.eval(), tmp_path / "parts")
    with pytest.raises(export.BundleError, match="probe .* weights fingerprint") as err:
        export.export_bundle(tiny_model_path, tmp_path / "bundle", probe=probe_dir)
    assert "\n" not in str(err.value) and not (tmp_path / "bundle").exists()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    good, _ = save_parts(model, tmp_path / "good")
    manifest = export.verify_bundle(export.export_bundle(tiny_model_path, tmp_path / "bundle", probe=good))
    assert manifest["base_model"][FINGERPRINT_KEY] == weight_fingerprint(model)


def test_kept_adapter_parts_are_checked_against_the_merged_policy(tiny_model_path, tmp_path):
    from peft import LoraConfig, get_peft_model

    from deploy.decoder import EfficientDecoder

    policy = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_path),
                            LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    policy.save_pretrained(tmp_path / "adapter")
    merged = copy.deepcopy(policy).merge_and_unload()
    probe_dir, router_dir = save_parts(merged, tmp_path / "parts")
    base_probe, _ = save_parts(AutoModelForCausalLM.from_pretrained(tiny_model_path), tmp_path / "base-parts")
    with pytest.raises(export.BundleError, match="weights fingerprint"):  # made for the base, not the policy
        export.export_bundle(str(tmp_path / "adapter"), tmp_path / "kept", probe=base_probe, keep_adapter=True)
    kept = export.export_bundle(str(tmp_path / "adapter"), tmp_path / "kept", probe_dir, router_dir, keep_adapter=True)
    decoder = EfficientDecoder.from_pretrained(str(kept), probe=str(probe_dir))  # an outside probe is checked too
    assert decoder.probe is not None and decoder.router is not None


def test_tampered_bundle_is_detected_and_cli_errors_are_one_line(tiny_model_path, tmp_path):
    out = export.export_bundle(tiny_model_path, tmp_path / "bundle")
    with open(out / "model" / "config.json", "a") as f:
        f.write(" ")
    with pytest.raises(export.BundleError, match="changed"):
        export.verify_bundle(out)
    run = subprocess.run([sys.executable, str(SCRIPT), "--policy", tiny_model_path, "--out", str(out)],
                         capture_output=True, text=True)
    assert run.returncode == 2 and "--overwrite" in run.stderr and len(run.stderr.strip().splitlines()) == 1


def test_lora_policy_is_merged_or_kept(tiny_model_path, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    ids = torch.tensor([[1, 5, 9, 3]])
    base_logits = AutoModelForCausalLM.from_pretrained(tiny_model_path)(ids).logits
    policy = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_path),
                            LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    expected = policy(ids).logits.detach()
    assert not torch.allclose(expected, base_logits, atol=1e-4)  # the adapter changes the outputs
    policy.save_pretrained(tmp_path / "adapter")

    merged = export.export_bundle(str(tmp_path / "adapter"), tmp_path / "merged")
    manifest = export.verify_bundle(merged)
    assert manifest["lora_merged"] and manifest["parts"]["adapter"] is None
    model = AutoModelForCausalLM.from_pretrained(merged / "model")
    assert not any("lora" in name for name in model.state_dict())
    torch.testing.assert_close(model(ids).logits, expected, atol=1e-5, rtol=1e-5)

    kept = export.export_bundle(str(tmp_path / "adapter"), tmp_path / "kept", keep_adapter=True)
    manifest = export.verify_bundle(kept)
    assert not manifest["lora_merged"] and manifest["parts"]["adapter"] == "adapter"
    torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(kept / "model")(ids).logits, base_logits)
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(kept / "model"), kept / "adapter")
    torch.testing.assert_close(reloaded(ids).logits, expected, atol=1e-5, rtol=1e-5)
