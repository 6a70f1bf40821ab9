"""Skip distillation while fine-tuning (algos/skip_distillation.py): the KL by hand, skip sets parsed and
checked, skipped blocks are the identity and get no gradient, the trainer's loss is CE + λ·KL of its two passes,
and a real SFT run brings a skipped path closer to the dense one than plain SFT does."""
from __future__ import annotations

import json
import math

import pytest
import torch


def _tiny(tmp_path, layers=3):
    from algos.models import load_causal_lm
    from tests.conftest import make_tiny_model

    return load_causal_lm(str(make_tiny_model(tmp_path / "tiny", num_hidden_layers=layers)), dtype=torch.float32)


def test_distillation_kl_by_hand_and_no_gradient_to_the_teacher():
    from algos.skip_distillation import distillation_kl

    # position 0: p = (1/2, 1/2), q = (1/4, 3/4): KL = 1/2 ln 2 + 1/2 ln(2/3) = 1/2 ln(4/3); position 1: masked out
    teacher = torch.tensor([[[0.5, 0.5], [0.9, 0.1]]]).log().requires_grad_()
    student = torch.tensor([[[0.25, 0.75], [0.1, 0.9]]]).log().requires_grad_()
    mask = torch.tensor([[1.0, 0.0]])
    kl = distillation_kl(teacher, student, mask, num_tokens=2)
    assert kl.item() == pytest.approx(0.5 * math.log(4 / 3) / 2)
    kl.backward()
    assert teacher.grad is None and student.grad is not None
    assert distillation_kl(teacher, teacher, torch.ones(1, 2), 2).item() == pytest.approx(0.0, abs=1e-7)


def test_skip_sets_are_parsed_deduplicated_and_checked():
    from algos.config import ConfigError
    from algos.skip_distillation import parse_skip_sets

    assert parse_skip_sets("3,4; 3-4 ;4,6;") == [(3, 4), (4, 6)]
    assert parse_skip_sets("2-4", 30) == [(2, 3, 4)]
    with pytest.raises(ConfigError, match="no skip set"):
        parse_skip_sets(" ; ")
    with pytest.raises(ConfigError, match="skip distillation sets: block 6 does not exist: the model has 6 blocks"):
        parse_skip_sets("3;5,6", 6)
    with pytest.raises(ConfigError, match="skips every block"):
        parse_skip_sets("0-2", 3)
    with pytest.raises(ConfigError, match="skip distillation sets must look like"):
        parse_skip_sets("3,x")


def test_skipped_blocks_are_the_identity_get_no_gradient_and_are_restored(tmp_path):
    from algos.skip_distillation import skippable_blocks

    model = _tiny(tmp_path)
    ids = torch.tensor([[5, 9, 11, 3]])
    with torch.no_grad():
        dense = model(ids).logits
        embedded_only = model.lm_head(model.model.norm(model.model.embed_tokens(ids)))
    with skippable_blocks(model) as skipped:
        with torch.no_grad():
            assert torch.equal(model(ids).logits, dense)  # the set starts empty: the dense path
            skipped.update({0, 1, 2})
            assert torch.allclose(model(ids).logits, embedded_only)
        skipped.clear()
        skipped.add(1)
        model(ids).logits.sum().backward()
        assert all(p.grad is None for p in model.model.layers[1].parameters())
        assert all(p.grad is not None for p in model.model.layers[2].parameters())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, dense)
    assert all("forward" not in vars(layer) for layer in model.model.layers)


def test_skip_set_draws_are_seeded():
    from algos.skip_distillation import SkipSetSampler

    sets = [(1,), (2,), (1, 2)]
    samplers = [SkipSetSampler(sets, seed) for seed in (3, 3, 4)]
    first, again, other = ([sampler.draw() for _ in range(20)] for sampler in samplers)
    assert first == again and first != other and set(first) == set(sets)


def test_trainer_loss_is_dense_cross_entropy_plus_weighted_kl(tiny_model_path, tmp_path):
    """compute_loss against the two passes done by hand: CE over the labelled tokens of the dense path plus
    λ · KL(dense ‖ path without block 1); the skip set is cleared afterwards."""
    import datasets
    from trl import SFTConfig

    from algos.models import load_causal_lm, load_tokenizer
    from algos.sft_trainer import SkipDistillationSFTTrainer
    from algos.skip_distillation import SkipSetSampler, skippable_blocks

    tokenizer = load_tokenizer(tiny_model_path, padding_side="right")
    rows = [{"prompt": "Q: " + "long prompt " * n, "completion": " answer" * (3 + 2 * n)} for n in (1, 4, 2)]
    model = load_causal_lm(tiny_model_path, dtype=torch.float32).train()
    args = SFTConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=3, use_cpu=True, bf16=False,
                     completion_only_loss=True, gradient_checkpointing=False, report_to="none", disable_tqdm=True,
                     dataloader_num_workers=0)
    with skippable_blocks(model) as skipped:
        trainer = SkipDistillationSFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                                             processing_class=tokenizer, skipped=skipped,
                                             sampler=SkipSetSampler([(1,)]), weight=0.5)
        batch = next(iter(trainer.get_train_dataloader()))
        loss = trainer.compute_loss(model, dict(batch)).item()
        assert skipped == set()
        labels = batch["labels"][:, 1:]
        mask = labels != -100
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        with torch.no_grad():
            dense = model(**inputs).logits[:, :-1].log_softmax(-1)
            skipped.add(1)
            student = model(**inputs).logits[:, :-1].log_softmax(-1)
            skipped.clear()
    n = mask.sum()
    ce = -(dense.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask).sum() / n
    kl = ((dense.exp() * (dense - student)).sum(-1) * mask).sum() / n
    assert kl > 0
    assert loss == pytest.approx((ce + 0.5 * kl).item(), rel=1e-5)
    assert trainer._metrics["train"]["skip_kl"][-1] == pytest.approx(kl.item(), rel=1e-5)


def _kl_dense_to_skipped(path, block: int) -> float:
    from algos.models import load_causal_lm, load_tokenizer
    from algos.sft import SFTJobConfig, thinking_records
    from algos.skip_distillation import skippable_blocks

    model, tokenizer = load_causal_lm(str(path), dtype=torch.float32).eval(), load_tokenizer(str(path))
    texts = [r["completion"] for r in thinking_records(SFTJobConfig(num_train_samples=4, seed=9))]
    ids = tokenizer(texts[0], return_tensors="pt").input_ids[:, :96]
    with skippable_blocks(model) as skipped, torch.no_grad():
        dense = model(ids).logits.log_softmax(-1)
        skipped.add(block)
        student = model(ids).logits.log_softmax(-1)
    return (dense.exp() * (dense - student)).sum(-1).mean().item()


def test_sft_with_skip_distillation_brings_the_skipped_path_to_the_dense_one(tmp_path, tiny_model_path):
    """Two real SFT runs from the same tiny model and seed: with skip distillation of block 1 the path without
    block 1 ends closer (in KL) to the dense path than after plain SFT; the saved model has the usual keys and
    the recipe records the sets. The tiny model's weights are drawn large, so that skipping a block matters."""
    from algos.models import load_causal_lm
    from algos.sft import SFTJobConfig, run_sft
    from tests.conftest import make_tiny_model

    make_tiny_model(tmp_path / "start", initializer_range=0.3)
    common = dict(model_name_or_path=str(tmp_path / "start"), num_train_samples=32, per_device_train_batch_size=4,
                  max_length=256, bf16=False, learning_rate=3e-2, progress=False)
    plain = run_sft(SFTJobConfig(output_dir=str(tmp_path / "plain"), **common))
    distilled = run_sft(SFTJobConfig(output_dir=str(tmp_path / "distilled"), skip_distillation_sets="1", **common))
    # KL(dense ‖ without block 1) on a held-out trace: 0.90 at the start; 0.33 after plain SFT, 0.13 distilled
    assert _kl_dense_to_skipped(distilled, 1) < 0.6 * _kl_dense_to_skipped(plain, 1)
    assert set(load_causal_lm(str(distilled)).state_dict()) == set(load_causal_lm(tiny_model_path).state_dict())
    recipe = json.loads((distilled / "sft_recipe.json").read_text())
    assert recipe["skip_distillation_sets"] == "1" and recipe["skip_distillation_weight"] == 1.0


@pytest.mark.parametrize("overrides, message", [
    (dict(skip_distillation_sets="5"), "skip distillation sets: block 5 does not exist: the model has 2 blocks"),
    (dict(skip_distillation_sets="1", layer_dropout=0.1), "choose one of layer dropout and skip distillation"),
    (dict(skip_distillation_sets="1", skip_distillation_weight=0.0), "skip distillation weight must be > 0"),
])
def test_sft_refuses_bad_skip_distillation_before_writing(tmp_path, tiny_model_path, overrides, message):
    from algos.config import ConfigError
    from algos.sft import SFTJobConfig, run_sft

    out = tmp_path / "runs" / "out"
    with pytest.raises(ConfigError, match=message):
        run_sft(SFTJobConfig(model_name_or_path=tiny_model_path, output_dir=str(out), num_train_samples=8,
                             progress=False, **overrides))
    assert not out.parent.exists() or not any(out.parent.iterdir())


@pytest.mark.parametrize("flags, message", [
    (["--skip_distillation_sets", "3,x"], "--skip_distillation_sets: skip distillation sets must look like"),
    (["--skip_distillation_sets", "3", "--layer_dropout", "0.1"], "choose one of them"),
    (["--skip_distillation_sets", "3", "--skip_distillation_weight", "-1"], "--skip_distillation_weight must be > 0"),
])
def test_sft_flags_reject_bad_skip_distillation_in_one_line(flags, message):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "train/sft.py", *flags], cwd=root, capture_output=True, text=True)
    assert done.returncode == 2 and message in done.stderr.splitlines()[-1]
