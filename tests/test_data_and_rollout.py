"""Datasets, prompts and the rollout engine's behaviour log-probs."""
from __future__ import annotations

import json

import pytest
import torch

from algos.data import (ArithmeticTask, DataConfigError, build_prompt, gsm8k_final_answer,
                        load_gsm8k, load_records)
from algos.logprobs import entropy_from_logits, logprobs_from_logits
from algos.models import load_causal_lm, load_tokenizer
from algos.rollout import HFGenerateEngine, SamplingParams, mask_top_k_top_p, response_mask_from_ids
from algos.trainer import position_ids_from_mask


def test_arithmetic_is_seeded_and_test_split_is_held_out():
    task = ArithmeticTask(digits=2, num_operands=3, operators="+-")
    a, b = task.generate(50, seed=7), task.generate(50, seed=7)
    assert a == b and a != task.generate(50, seed=8)
    for p in a:
        assert eval(p["expression"]) == int(p["answer"])
        assert all(10 <= int(tok) <= 99 for tok in p["expression"].split() if tok.isdigit())
    test = {p["expression"] for p in task.generate(200, seed=7, split="test")}
    assert not test & {p["expression"] for p in task.generate(2000, seed=7)}
    with pytest.raises(DataConfigError):
        ArithmeticTask(operators="/")


def test_tiny_arithmetic_space_keeps_test_problems_out_of_training():
    task = ArithmeticTask(digits=1, num_operands=2)  # 100 problems in all
    test = [p["expression"] for p in task.generate(200, seed=0, split="test")]
    train = {p["expression"] for p in task.generate(5000, seed=0)}
    assert len(test) == len(set(test)) and 20 <= len(test) <= 40  # distinct, about 30% of 100
    assert not set(test) & train and len(train) + len(test) == 100


def test_shipped_gsm8k():
    records = load_gsm8k()
    assert len(records) == 7473
    assert records[0]["answer"] == "72" and "Natalia" in records[0]["question"]
    assert gsm8k_final_answer("so 1,234 in all\n#### 1,234") == "1234"


def test_local_jsonl_with_column_mapping(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps({"problem": f"q{i}", "solution": str(i)}) for i in range(3)))
    records = load_records(str(path), question_column="problem", answer_column="solution")
    assert [r["question"] for r in records] == ["q0", "q1", "q2"] and records[2]["answer"] == "2"
    with pytest.raises(DataConfigError, match="neither a 'prompt' column .* nor a 'question' column"):
        load_records(str(path))
    with pytest.raises(DataConfigError, match="does not exist"):
        load_records(str(tmp_path / "missing.jsonl"))


def test_prompt_uses_chat_template_and_template_errors(tiny_model_path):
    tok = load_tokenizer(tiny_model_path)
    text = build_prompt(tok, "What is 1 + 2?")
    assert text.startswith("<|im_start|>") and "What is 1 + 2?" in text and text.endswith("assistant\n")
    assert build_prompt(tok, "Q", "{question}!", use_chat_template=False) == "Q!"
    with pytest.raises(DataConfigError, match="question"):
        build_prompt(tok, "Q", "{query}")


def test_top_k_top_p_masking_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(mask_top_k_top_p(logits, top_k=2)).tolist() == [[False, False, True, True]]
    # nucleus 0.7: 0.5 (mass before 0) + 0.3 (mass before 0.5 < 0.7) kept; 0.15 has 0.8 before it.
    assert torch.isinf(mask_top_k_top_p(logits, top_p=0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(mask_top_k_top_p(logits, top_p=0.85)).tolist() == [[False, False, False, True]]


def test_response_mask_stops_after_first_eos():
    ids = torch.tensor([[5, 6, 2, 2, 2], [5, 6, 7, 8, 9]])
    mask, reasons = response_mask_from_ids(ids, [2])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]] and reasons == ["stop", "length"]


def test_rollout_logprobs_match_a_training_forward(tiny_model_path):
    tok = load_tokenizer(tiny_model_path)
    model = load_causal_lm(tiny_model_path)
    engine = HFGenerateEngine(tok, SamplingParams(max_new_tokens=12, temperature=0.7))
    prompts = [build_prompt(tok, q) for q in ("What is 2 + 3?", "Name a colour, briefly please.")]
    torch.manual_seed(0)
    batch = engine.generate(model, prompts, num_generations=3, extras={"answer": ["5", "red"]})
    assert batch.group_ids.tolist() == [0, 0, 0, 1, 1, 1] and batch.extras["answer"][3] == "red"
    positions = position_ids_from_mask(batch.attention_mask)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                   position_ids=positions).logits[:, batch.prompt_ids.shape[1] - 1:-1] / 0.7
    mask = batch.response_mask.bool()
    torch.testing.assert_close(logprobs_from_logits(logits, batch.response_ids)[mask], batch.logprobs[mask],
                               atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(entropy_from_logits(logits)[mask], batch.entropies[mask], atol=1e-4, rtol=1e-4)
