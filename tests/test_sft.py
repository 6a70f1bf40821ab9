"""SFT (algos/sft.py, train/sft.py): the thinking chat template, a real SFTTrainer run on the tiny model
saved atomically with its recipe, and one-line errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def _tokenizer():
    from algos.models import load_tokenizer

    return load_tokenizer(None)


def test_thinking_template_keeps_single_turn_prompts_and_drops_earlier_thinking():
    from algos.sft import thinking_chat_template
    from probes.cues import has_thinking_block

    tokenizer = _tokenizer()
    original = tokenizer.chat_template
    assert not has_thinking_block(tokenizer)
    question = [{"role": "user", "content": "What is 1 + 2?"}]
    before = tokenizer.apply_chat_template(question, tokenize=False, add_generation_prompt=True)
    tokenizer.chat_template = thinking_chat_template(original)
    assert has_thinking_block(tokenizer)
    assert tokenizer.apply_chat_template(question, tokenize=False, add_generation_prompt=True) == before

    history = question + [{"role": "assistant", "content": "<think>\n1 + 2 = 3.\n</think>\nThe answer is 3."},
                          {"role": "user", "content": "And 3 + 4?"},
                          {"role": "assistant", "content": "<think>\n3 + 4 = 7.\n</think>\nThe answer is 7."}]
    text = tokenizer.apply_chat_template(history, tokenize=False)
    assert "1 + 2 = 3." not in text and "The answer is 3." in text  # an earlier turn loses its thinking
    assert "<think>\n3 + 4 = 7.\n</think>" in text                   # the last turn keeps it
    assert thinking_chat_template(tokenizer.chat_template) == tokenizer.chat_template  # idempotent


def test_add_think_tokens_adds_two_single_tokens_and_mean_rows(tiny_model_path):
    from algos.models import load_causal_lm, load_tokenizer
    from algos.sft import add_think_tokens

    tokenizer, model = load_tokenizer(tiny_model_path), load_causal_lm(tiny_model_path)
    rows = model.get_input_embeddings().weight.shape[0]
    assert add_think_tokens(model, tokenizer) == 2
    assert len(tokenizer("</think>", add_special_tokens=False).input_ids) == 1
    assert model.get_input_embeddings().weight.shape[0] >= rows + 2
    assert "<think>" in tokenizer.decode(tokenizer("<think>x", add_special_tokens=False).input_ids)
    assert add_think_tokens(model, tokenizer) == 0  # already there


def test_run_sft_trains_and_saves_atomically_with_its_recipe(tiny_model_path, tmp_path):
    from algos.fingerprint import weight_fingerprint
    from algos.models import load_causal_lm, load_tokenizer
    from algos.sft import SFTJobConfig, run_sft
    from algos.thinking_task import ThinkingTask, TraceStyle

    task = ThinkingTask(style=TraceStyle(recheck_rate=0.5))
    config = SFTJobConfig(model_name_or_path=tiny_model_path, output_dir=str(tmp_path / "sft"),
                          num_train_samples=8, per_device_train_batch_size=4, max_length=256, bf16=False,
                          learning_rate=1e-2, progress=False, task=task)
    out = run_sft(config)
    assert out == tmp_path / "sft" and (out / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sft"]  # no temporary directory left
    recipe = json.loads((out / "sft_recipe.json").read_text())
    assert recipe["num_train_samples"] == 8 and recipe["task"]["style"]["recheck_rate"] == 0.5
    assert recipe["bf16"] is False  # the precision it ran in
    tuned, base = load_causal_lm(out), load_causal_lm(tiny_model_path)
    assert weight_fingerprint(tuned) != weight_fingerprint(base)  # it trained
    assert "</think>" in load_tokenizer(out).chat_template


def test_label_window_loss_equals_trls_fused_head_loss(tiny_model_path, tmp_path):
    """The CPU trainer's loss, gradients and metrics are TRL's, from logits of the labelled window only."""
    import torch
    from trl import SFTConfig, SFTTrainer

    from algos.models import load_causal_lm, load_tokenizer
    from algos.sft_trainer import LabelWindowSFTTrainer
    import datasets

    tokenizer = load_tokenizer(tiny_model_path, padding_side="right")
    rows = [{"prompt": "Q: " + "long prompt " * n, "completion": " answer" * (3 + 2 * n)} for n in (1, 4, 2)]
    results = []
    for trainer_class in (SFTTrainer, LabelWindowSFTTrainer):
        model = load_causal_lm(tiny_model_path, dtype=torch.float32).train()
        args = SFTConfig(output_dir=str(tmp_path / trainer_class.__name__), per_device_train_batch_size=3,
                         use_cpu=True, bf16=False, completion_only_loss=True, gradient_checkpointing=False,
                         report_to="none", disable_tqdm=True, dataloader_num_workers=0)
        trainer = trainer_class(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                                processing_class=tokenizer)
        batch = next(iter(trainer.get_train_dataloader()))
        kept = []  # how many positions our trainer asks logits for
        if trainer_class is LabelWindowSFTTrainer:
            model.register_forward_hook(lambda module, args, out: kept.append(out.logits.shape[1]))
        for num_items in (None, 40):  # the batch's own label count; a count over accumulated micro-batches
            model.zero_grad()
            loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=num_items)
            loss.backward()
            results.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
        metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
        results.append(metrics)
    trl_none, trl_40, trl_metrics, ours_none, ours_40, ours_metrics = results
    for trl, ours in ((trl_none, ours_none), (trl_40, ours_40)):
        assert ours[0] == pytest.approx(trl[0], rel=1e-5)
        for g_trl, g_ours in zip(trl[1], ours[1]):
            torch.testing.assert_close(g_ours, g_trl, rtol=1e-4, atol=1e-6)
    labels = batch["labels"]
    assert ours_none[0] * (labels != -100).sum().item() == pytest.approx(ours_40[0] * 40, rel=1e-5)
    assert set(ours_metrics) == {"entropy", "mean_token_accuracy", "num_tokens"}
    assert ours_metrics == pytest.approx(trl_metrics, rel=1e-5)
    first_label = int((labels != -100).any(0).nonzero()[0])
    assert kept == [labels.shape[1] - first_label + 1] * 2 and first_label > 1  # no logits for leading prompt positions


def test_sft_entry_point_refuses_bad_input_with_one_line(capsys, tmp_path):
    from train.sft import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--digits", "0", "--output_dir", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: thinking task needs digits >= 1"
    with pytest.raises(SystemExit):
        main(["--correction_rate", "2", "--output_dir", str(tmp_path / "x")])
    assert "correction_rate must be in [0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_sft_dataset_without_trl_columns_is_one_line(tiny_model_path, tmp_path, capsys):
    from train.sft import main

    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"question": "1 + 1", "answer": "2"}) + "\n")
    with pytest.raises(SystemExit):
        main(["--model_name_or_path", tiny_model_path, "--dataset", str(data), "--output_dir", str(tmp_path / "x")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(err) == 1 and "needs 'prompt' and 'completion'" in err[0] and "question, answer" in err[0]
    assert not (tmp_path / "x").exists()


def test_default_model_name_resolves_to_the_cached_thinking_build(monkeypatch, tmp_path):
    import algos.sft
    from algos.models import resolve_model_path

    asked = []
    monkeypatch.setenv("REPRO_RL_CACHE", str(tmp_path))
    monkeypatch.setattr(algos.sft, "build_cached", lambda target: asked.append(target) or target)
    path = resolve_model_path("smollm2-135m-thinking")
    assert asked == [tmp_path / f"smollm2-135m-thinking-{algos.sft.RECIPE_VERSION}"] and path == str(asked[0])
    assert algos.sft.THINKING_RECIPE.dataset == "thinking" and algos.sft.THINKING_RECIPE.model_name_or_path is None


def test_build_cached_builds_once_in_a_child_process(tiny_model_path, tmp_path):
    from algos.models import ModelLoadError
    from algos.sft import build_cached

    tiny = {"model_name_or_path": tiny_model_path, "num_train_samples": 8, "per_device_train_batch_size": 4,
            "max_length": 256, "bf16": False, "learning_rate": 1e-2, "progress": False}
    # two processes of one launch ask at once (with a launcher's state, which the child drops): one builds
    code = "import json, sys; from algos.sft import build_cached; build_cached(sys.argv[1], json.loads(sys.argv[2]))"
    env = {**os.environ, "ACCELERATE_MIXED_PRECISION": "bf16", "PYTHONPATH": str(Path(__file__).parents[1])}
    target = tmp_path / "thinking"
    both = [subprocess.Popen([sys.executable, "-c", code, str(target), json.dumps(tiny)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in both]
    assert [p.returncode for p in both] == [0, 0], outputs
    assert sum("building the thinking default" in out for out in outputs) == 1, outputs
    assert (target / "model.safetensors").exists()
    assert json.loads((target / "sft_recipe.json").read_text())["num_train_samples"] == 8
    stamp = (target / "model.safetensors").stat().st_mtime
    # cached: a second call returns it without building (this recipe could not build)
    assert build_cached(target, {"model_name_or_path": str(tmp_path / "missing")}) == target
    assert (target / "model.safetensors").stat().st_mtime == stamp
    with pytest.raises(ModelLoadError, match="building smollm2-135m-thinking failed.*train/sft.py"):
        build_cached(tmp_path / "other", {**tiny, "model_name_or_path": str(tmp_path / "missing")})
    assert not (tmp_path / "other").exists()
