"""scripts/evaluate.py: every decoder on a bundle, outputs, per-sample resume, refusals in one line."""
from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from deploy.bundle import export_bundle
from deploy.decoder import EfficientDecoder
from script_loader import load_script

evaluate = load_script("scripts/evaluate.py")
SCRIPT = Path(evaluate.__file__)  # the same script, run as a command by the CLI tests

DECODERS = "plain,lynx,eager,drllm"
CONFIGS = ["plain", "lynx@0.9", "lynx@0.99", "eager", "drllm"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def bundle(tiny_model_path, tmp_path_factory) -> str:
    """The tiny model with a random LYNX probe and Dr.LLM router, as a deploy bundle."""
    from algos.fingerprint import base_identity
    from probes.conformal import ConformalCalibration
    from probes.cues import cue_preset, default_exit_string
    from probes.export import LynxProbe, save_probe
    from probes.probe import ExitProbe
    from routers.export import save_router
    from routers.router import PathRouter

    where = tmp_path_factory.mktemp("eval-bundle")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    torch.manual_seed(0)
    probe = ExitProbe(2 * model.config.hidden_size, (16, 8))
    probe.set_standardisation(torch.randn(20, probe.input_dim))
    calibration = ConformalCalibration.from_probs(torch.rand(40), torch.arange(40) % 2)
    lynx = LynxProbe(probe=probe.eval(), calibration=calibration, layers=(1, 2), cue_config=cue_preset("words", True),
                     exit_string=default_exit_string(True), base_model=base_identity(model), default_confidence=0.9)
    probe_dir = save_probe(where / "lynx", lynx)
    router = PathRouter(model.config.num_hidden_layers, model.config.hidden_size)
    router_dir = save_router(router, where / "router", model)
    return str(export_bundle(tiny_model_path, where / "bundle", probe_dir, router_dir))


def argv(bundle: str, out: Path, *extra: str) -> list[str]:
    return ["--model", bundle, "--dataset", "arithmetic", "--decoder", DECODERS, "--confidence", "0.9,0.99",
            "--num_samples", "6", "--batch_size", "4", "--max_new_tokens", "8", "--max_branches", "3",
            "--output_dir", str(out), "--threads", "1", *extra]


def one_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def test_evaluate_all_decoders_then_resume_and_refuse(bundle, tmp_path, capsys, monkeypatch):
    out = tmp_path / "eval"
    assert evaluate.main(argv(bundle, out)) == 0
    printed = capsys.readouterr().out
    header = printed.splitlines()[0].split()
    assert header[:3] == ["config", "problems", "accuracy"] and all(f"\n{c} " in printed for c in CONFIGS)
    assert "results.json" in printed and "pareto.png" in printed

    results = json.loads((out / "results.json").read_text())
    rows = {r["config"]: r for r in results["results"]}
    assert list(rows) == CONFIGS and results["settings"]["num_samples"] == 6
    for name, r in rows.items():
        assert r["problems"] == 6 and 0 <= r["accuracy"] <= 1, name
        assert r["tokens_mean"] > 0 and r["tokens_p90"] >= r["seq_tokens_mean"] > 0 and r["seconds"] > 0, name
        assert r["tokens_per_s"] > 0 and 0 < r["layers_per_token"] and r["num_layers"] == 2, name
        assert (r["exit_rate"] is not None) == name.startswith("lynx"), name
    assert rows["plain"]["layers_per_token"] == 2 and rows["plain"]["tokens_mean"] == rows["plain"]["seq_tokens_mean"]
    eager = rows["eager"]
    assert 1 <= eager["samples_per_prompt"] <= 3 and eager["accuracy"] == eager["cons_at_k"]
    assert eager["pass_rate"] <= eager["pass_at_k"] and eager["cons_at_k"] <= eager["pass_at_k"]
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["config"] for r in table] == CONFIGS and set(evaluate.COLUMNS) == set(table[0])
    for png in ("pareto.png", "lengths.png"):
        data = (out / png).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000, png
    for name in CONFIGS:
        records = [json.loads(line) for line in (out / "samples" / f"{name}.jsonl").read_text().splitlines()]
        assert sorted(r["index"] for r in records) == list(range(6))
        assert all(len(r["texts"]) == len(r["tokens"]) == len(r["correct"]) for r in records)
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]

    # the same command again: everything comes from the sample files, nothing is decoded
    def refuse(*args, **kwargs):
        raise AssertionError("generate called on a finished evaluation")

    monkeypatch.setattr(EfficientDecoder, "generate", refuse)
    assert evaluate.main(argv(bundle, out)) == 0
    assert json.loads((out / "results.json").read_text())["results"] == results["results"]
    capsys.readouterr()

    # a run killed inside the second batch: only that batch is decoded again, with the same result
    monkeypatch.undo()
    plain = out / "samples" / "plain.jsonl"
    lines = plain.read_text().splitlines()
    plain.write_text("\n".join(lines[:5]) + "\n" + lines[5][:20])
    calls = []
    original = EfficientDecoder.generate
    monkeypatch.setattr(EfficientDecoder, "generate", lambda self, prompts, **kw: calls.append(len(prompts))
                        or original(self, prompts, **kw))
    assert evaluate.main(argv(bundle, out, "--decoder", "plain")) == 0
    assert calls == [2]
    again = json.loads((out / "results.json").read_text())["results"][0]
    assert {k: again[k] for k in ("accuracy", "tokens_mean", "tokens_p90")} == \
        {k: rows["plain"][k] for k in ("accuracy", "tokens_mean", "tokens_p90")}
    assert len(plain.read_text().splitlines()) == 6
    capsys.readouterr()

    # other settings are refused in one line naming the setting; --overwrite starts fresh
    assert evaluate.main(argv(bundle, out, "--max_new_tokens", "9")) == 2
    assert "max_new_tokens" in one_line(capsys.readouterr().err)
    calls.clear()
    assert evaluate.main(argv(bundle, out, "--decoder", "plain", "--max_new_tokens", "9", "--overwrite")) == 0
    assert calls == [4, 2] and not (out / "samples" / "eager.jsonl").exists()
    capsys.readouterr()

    # other weights under the same path in the same output_dir: refused by the model's fingerprint
    from conftest import make_tiny_model

    model_dir, out2 = str(make_tiny_model(tmp_path / "model", seed=0)), tmp_path / "eval2"
    assert evaluate.main(argv(model_dir, out2, "--decoder", "plain")) == 0
    make_tiny_model(tmp_path / "model", seed=1)
    capsys.readouterr()
    assert evaluate.main(argv(model_dir, out2, "--decoder", "plain")) == 2
    assert "fingerprints" in one_line(capsys.readouterr().err)


def test_bad_inputs_end_in_one_line(bundle, tiny_model_path, tmp_path, capsys):
    out = tmp_path / "eval"
    assert evaluate.main(argv(bundle, out, "--dataset", str(tmp_path / "missing.jsonl"))) == 2
    assert "missing.jsonl" in one_line(capsys.readouterr().err)
    assert evaluate.main(argv(str(tmp_path / "no-model"), out, "--decoder", "plain")) == 2
    one_line(capsys.readouterr().err)
    assert evaluate.main(argv(tiny_model_path, out, "--decoder", "drllm")) == 2      # a plain model has no router
    assert "router" in one_line(capsys.readouterr().err)
    with pytest.raises(SystemExit) as exc:
        evaluate.main(argv(bundle, out, "--decoder", "plain,fast"))
    assert exc.value.code == 2 and "fast" in one_line(capsys.readouterr().err)
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM not installed")
def test_plain_decoder_on_vllm_gives_the_hf_plain_texts(tmp_path):
    """--use_vllm: 'plain' on the vLLM engine (fp32, greedy) against our plain decoder on the default model.
    Run in a subprocess: vLLM allows one engine per process."""
    import subprocess
    import sys

    common = [sys.executable, str(SCRIPT), "--dataset", "arithmetic", "--decoder", "plain", "--num_samples", "12",
              "--max_new_tokens", "24", "--batch_size", "6"]
    runs = {}
    for flag in ("false", "true"):
        out = tmp_path / f"vllm_{flag}"
        result = subprocess.run([*common, "--use_vllm", flag, "--output_dir", str(out)], capture_output=True,
                                text=True, timeout=900, cwd=SCRIPT.parents[1])
        assert result.returncode == 0, result.stderr[-3000:]
        assert (out / "results.json").is_file() and (out / "pareto.png").is_file()
        runs[flag] = [json.loads(l) for l in open(out / "samples" / "plain.jsonl")]
    assert "decodes with vLLM" in result.stdout
    hf, vllm = runs["false"], runs["true"]
    assert [r["index"] for r in hf] == [r["index"] for r in vllm] == list(range(12))
    same = sum(a["texts"] == b["texts"] for a, b in zip(hf, vllm))
    assert same >= 11, f"only {same}/12 greedy texts agree"  # fp32 both: near ties may flip one argmax
    assert all(r["layers"] == [r["num_layers"]] and r["exited"] == [False] for r in vllm)
