"""Reward functions and datasets written for TRL, verl and OpenRLHF run unchanged.

The GRPO tests take one step on a tiny random Llama and check the reward values the run logged
(metrics.jsonl, and each completion's values in completions.jsonl) against the same function
called by hand on the logged completion in its framework's format; they print those values
(``pytest -s`` shows them).
"""
from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from algos.advantages import grpo
from algos.batch import RolloutBatch
from algos.config import RLConfig
from algos.data import DataConfigError, load_records
from algos.data_formats import dataset_prompt, render_prompt
from algos.models import load_causal_lm, load_tokenizer
from algos.trainer import RLTrainer
from rewards import RewardConfigError, RewardStack
from rewards.repro import ReproConfig, ReproReward
from plain_settings import PLAIN

TESTS = Path(__file__).parent
REWARDS = str(TESTS / "rewards_for_tests.py")
VERL_FILE = str(TESTS / "verl_compute_score.py")
QUESTIONS = [("What is 2 + 3?", "5"), ("What is 4 + 4?", "8"), ("What is 7 - 2?", "5"), ("What is 3 * 3?", "9")]


def grpo_step(model_path, out, dataset, reward, prompts: int = 2, **overrides) -> tuple[dict, list[dict]]:
    """One GRPO step (``prompts`` x 4 completions); (the step's metrics, every logged completion)."""
    n = 4 * prompts
    values = dict(PLAIN, model_name_or_path=model_path, output_dir=str(out), dataset=str(dataset), reward=reward,
                  max_steps=1, num_generations=4, per_device_train_batch_size=n, max_completion_length=8,
                  num_eval_samples=0, report_to="none", log_completions_steps=1, num_completions_to_print=n,
                  learning_rate=1e-3, seed=3)
    values.update(overrides)
    RLTrainer(RLConfig(**values)).train()
    metrics = [json.loads(line) for line in open(Path(out) / "metrics.jsonl")]
    rows = [json.loads(line) for line in open(Path(out) / "completions.jsonl")]
    step = [m for m in metrics if "loss/policy" in m]
    assert len(step) == 1 and len(rows) == n
    print({k: v for k, v in step[0].items() if k.startswith("reward")})
    for row in rows:
        print({k: v for k, v in row.items() if k.startswith("reward") or k == "completion"})
    return step[0], rows


def logged_mean(rows, name) -> float:
    values = [r[f"rewards/{name}"] for r in rows if r[f"rewards/{name}"] is not None]
    return sum(values) / len(values) if values else float("nan")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture(scope="module")
def number_model_path(tmp_path_factory) -> str:
    """The tiny random Llama with the digit tokens' (tied) embeddings scaled up 20x, so its random
    completions hold numbers now and then: a verl math scorer then gives varied values."""
    from conftest import make_tiny_model

    path = make_tiny_model(tmp_path_factory.mktemp("tiny-numbers"))
    tok, model = load_tokenizer(str(path)), load_causal_lm(str(path))
    with torch.no_grad():
        model.get_input_embeddings().weight[[tok.convert_tokens_to_ids(str(d)) for d in range(10)]] *= 20
    model.save_pretrained(path)
    return str(path)


def verl_rows(n: int = 8) -> list[dict]:
    """verl's parquet layout (as its examples/data_preprocess scripts write it)."""
    return [{"data_source": "openai/gsm8k", "prompt": [{"role": "user", "content": q}], "ability": "math",
             "reward_model": {"style": "rule", "ground_truth": a}, "extra_info": {"split": "train", "index": i}}
            for i, (q, a) in enumerate((QUESTIONS * n)[:n])]


# --- GRPO steps with real functions ----------------------------------------------------------------

def test_trl_rewards_on_conversational_dataset(tiny_model_path, tmp_path, monkeypatch):
    """TRL's own `trl.rewards` functions, a TRL conversational dataset, no column flags."""
    from trl.rewards import accuracy_reward, think_format_reward

    monkeypatch.setenv("REPRO_TEST_RECORD_DIR", str(tmp_path))
    solutions = ["5", "8", "see the worked example", "ask a teacher"]  # the last two cannot be parsed: None
    data = write_jsonl(tmp_path / "trl.jsonl", [{"prompt": [{"role": "user", "content": q}], "solution": s}
                                                for (q, _), s in zip(QUESTIONS, solutions)])
    step, rows = grpo_step(tiny_model_path, tmp_path / "run", data,
                           f"trl.rewards:accuracy_reward,trl.rewards:think_format_reward,{REWARDS}:record_call",
                           prompts=4)
    assert sorted(map(str, {r["rewards/accuracy_reward"] for r in rows})) == ["0.0", "None"]
    for row in rows:  # each logged value is what TRL's function gives for that completion, in TRL's format
        completion = [{"role": "assistant", "content": row["completion"]}]
        assert row["rewards/accuracy_reward"] == accuracy_reward([completion], [row["answer"]])[0]
        assert row["rewards/think_format_reward"] == think_format_reward([completion])[0]
    assert step["rewards/accuracy_reward"] == pytest.approx(logged_mean(rows, "accuracy_reward"))
    assert step["rewards/think_format_reward"] == pytest.approx(logged_mean(rows, "think_format_reward"))
    calls = [json.loads(line) for line in open(tmp_path / "calls.jsonl")]
    assert len(calls) == 1
    call = calls[0]
    assert call["prompt"][0]["role"] == "user" and call["prompt"][0]["content"] in {q for q, _ in QUESTIONS}
    assert call["completion"][0]["role"] == "assistant" and isinstance(call["completion"][0]["content"], str)
    assert all(isinstance(t, int) for t in call["completion_ids"])
    assert {"solution", "answer"} <= set(call["keywords"]) and "prompt" not in call["keywords"]
    assert call["global_step"] == 0 and call["max_steps"] == 1


def test_trl_reward_on_a_question_and_solution_dataset(tiny_model_path, tmp_path):
    """The issue's report: question + solution columns with trl.rewards:accuracy_reward stopped with
    'string indices must be integers' (completions were strings for a chat prompt)."""
    from trl.rewards import accuracy_reward

    data = write_jsonl(tmp_path / "qs.jsonl", [{"question": q, "solution": a} for q, a in QUESTIONS])
    step, rows = grpo_step(tiny_model_path, tmp_path / "run", data, "trl.rewards:accuracy_reward")
    for row in rows:
        completion = [{"role": "assistant", "content": row["completion"]}]
        assert row["rewards/accuracy_reward"] == accuracy_reward([completion], [row["answer"]])[0]
    assert step["rewards/accuracy_reward"] == 0.0


def test_verl_compute_score_file_and_parquet_dataset(number_model_path, tmp_path):
    """A verl reward file (bare path: its compute_score, dict return) on a verl-style parquet dataset."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("verl_file", VERL_FILE)
    verl = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(verl)
    data = tmp_path / "train.parquet"
    pd.DataFrame(verl_rows()).to_parquet(data)
    step, rows = grpo_step(number_model_path, tmp_path / "run", data, f"{VERL_FILE},accuracy",
                           max_completion_length=16)
    for row in rows:
        assert row["answer"] in {a for _, a in QUESTIONS}  # reward_model.ground_truth became the gold answer
        expected = verl.compute_score("openai/gsm8k", row["completion"], row["answer"], {})["score"]
        assert row["rewards/compute_score"] == pytest.approx(expected)
    assert step["rewards/compute_score"] == pytest.approx(logged_mean(rows, "compute_score"))
    assert len({r["rewards/compute_score"] for r in rows}) > 1  # some completions hold a number
    assert "rewards/accuracy" in step


def test_async_reward_in_a_grpo_step(tiny_model_path, tmp_path):
    step, rows = grpo_step(tiny_model_path, tmp_path / "run", "arithmetic",
                           f"{REWARDS}:async_length,{REWARDS}:length_reward")
    for row in rows:
        assert row["rewards/async_length"] == pytest.approx(len(row["completion"]) / 100.0)
    assert step["rewards/async_length"] == pytest.approx(step["rewards/length_reward"])
    assert step["rewards/async_length"] > 0


def make_reward_model(path: Path) -> Path:
    """A tiny random Llama sequence classifier (num_labels=1) with the default tokenizer."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tokenizer = load_tokenizer(None)
    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id)
    LlamaForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_sequence_classification_reward_model(tiny_model_path, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model_dir = make_reward_model(tmp_path / "tiny-rm")
    prompt = [{"role": "user", "content": "Say something nice."}]
    data = write_jsonl(tmp_path / "trl.jsonl", [{"prompt": prompt, "id": i} for i in range(8)])
    step, rows = grpo_step(tiny_model_path, tmp_path / "run", data, str(model_dir))
    # TRL's recipe, one completion at a time: chat template over prompt + completion, logits[:, 0]
    tok = AutoTokenizer.from_pretrained(model_dir)
    rm = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1).eval()
    for row in rows:
        text = tok.apply_chat_template(prompt + [{"role": "assistant", "content": row["completion"]}], tokenize=False)
        with torch.no_grad():
            expected = rm(**tok(text, return_tensors="pt", add_special_tokens=False)).logits[0, 0].item()
        assert row["rewards/tiny-rm"] == pytest.approx(expected, abs=1e-5)
    assert step["rewards/tiny-rm"] == pytest.approx(logged_mean(rows, "tiny-rm"), abs=1e-6)
    assert len({round(r["rewards/tiny-rm"], 6) for r in rows}) > 1  # completions differ, so do scores


# --- conventions and errors, without training ------------------------------------------------------

def test_trl_accuracy_reward_scores_a_right_conversational_answer():
    stack = RewardStack("trl.rewards:accuracy_reward,accuracy,format")
    prompts = [[{"role": "user", "content": "What is 2 + 3?"}]] * 3
    out = stack(prompts, ["So \\boxed{5}", "So \\boxed{6}", "So \\boxed{5}"],
                solution=["5", "5", "no answer here"], answer=["5", "5", None])
    assert out.components["accuracy_reward"].tolist()[:2] == [1.0, 0.0]
    assert math.isnan(out.components["accuracy_reward"][2])  # unparseable gold: None, as TRL
    assert out.components["accuracy"].tolist()[:2] == [1.0, 0.0]
    assert out.total.tolist() == [3.0, 1.0, 1.0]  # None skipped in the weighted sum


def test_standard_prompts_give_string_completions():
    seen = {}

    def spy(prompts, completions, **kwargs):
        seen.update(prompts=prompts, completions=completions)
        return [1.0] * len(completions)

    RewardStack([spy])(["2 + 3 ="], [" 5"])
    assert seen == {"prompts": ["2 + 3 ="], "completions": [" 5"]}
    RewardStack([spy])([[{"role": "user", "content": "2 + 3?"}]], ["5"])
    assert seen["completions"] == [[{"role": "assistant", "content": "5"}]]


def test_verl_and_openrlhf_conventions():
    calls = []

    def compute_score(data_source, solution_str, ground_truth, extra_info=None):
        calls.append((data_source, solution_str, ground_truth, extra_info))
        return {"score": float(ground_truth in solution_str), "extra": 1}

    def reward_func(queries, prompts, labels, **kwargs):
        return {"rewards": torch.tensor([float(q.endswith(label)) for q, label in zip(queries, labels)])}

    def plain_reward_func(queries, prompts, labels):
        return torch.tensor([float(q.startswith(p)) for q, p in zip(queries, prompts)])

    stack = RewardStack([compute_score, reward_func, plain_reward_func])
    out = stack([[{"role": "user", "content": "2+3?"}]] * 2, ["5", "6"], prompt_texts=["<u>2+3?</u>"] * 2,
                data_source=["gsm8k", "gsm8k"], reward_model=[{"ground_truth": "5"}, {"ground_truth": "5"}],
                extra_info=[{"index": 0}, None], answer=["5", "6"])
    assert calls == [("gsm8k", "5", "5", {"index": 0}), ("gsm8k", "6", "5", {})]
    assert out.components["compute_score"].tolist() == [1.0, 0.0]
    assert out.components["reward_func"].tolist() == [1.0, 1.0]  # labels are the answer column
    assert out.components["plain_reward_func"].tolist() == [1.0, 1.0]  # queries = prompt text + completion


def test_async_rewards_run_concurrently():
    """Each function waits for the other to start: run one after the other, they would time out."""
    started = {}

    def make(name, other):
        async def reward(prompts, completions, **kwargs):
            started.setdefault(name, asyncio.Event()).set()
            await asyncio.wait_for(started.setdefault(other, asyncio.Event()).wait(), timeout=5)
            return [1.0] * len(completions)
        reward.__name__ = name
        return reward

    out = RewardStack([make("a", "b"), make("b", "a")])(["p"], ["c"])
    assert out.total.tolist() == [2.0]


def test_unrecognised_signature_and_missing_column_are_one_line():
    def scorer(text, gold):
        return 1.0

    with pytest.raises(RewardConfigError) as info:
        RewardStack([scorer])
    message = str(info.value)
    assert "\n" not in message and "'scorer' takes (text, gold)" in message
    assert "compute_score(data_source, solution_str, ground_truth" in message and "reward_func(queries" in message
    with pytest.raises(RewardConfigError, match="needs the dataset column\\(s\\) solution"):
        RewardStack("trl.rewards:accuracy_reward")([[{"role": "user", "content": "q"}]], ["a"], answer=["1"])


def test_unloadable_reward_model_is_one_line(tmp_path):
    with pytest.raises(RewardConfigError) as info:
        RewardStack(str(tmp_path))  # a directory without a model
    assert "\n" not in str(info.value) and "loadable sequence-classification model" in str(info.value)


def test_cli_refusals_are_one_line(tiny_model_path, tmp_path):
    import subprocess
    import sys

    bad_reward = tmp_path / "bad.py"
    bad_reward.write_text("def score(text, gold):\n    return 1.0\n")
    no_prompt = write_jsonl(tmp_path / "text.jsonl", [{"text": "hi", "answer": "1"}] * 4)
    for args, needle in [(["--reward", f"{bad_reward}:score"], "'score' takes (text, gold); expected TRL's"),
                         (["--dataset", str(no_prompt)], "neither a 'prompt' column")]:
        result = subprocess.run([sys.executable, "train/grpo.py", "--model_name_or_path", tiny_model_path,
                                 "--report_to", "none", "--output_dir", str(tmp_path / "out"), *args],
                                cwd=TESTS.parent, capture_output=True, text=True, timeout=300)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert result.returncode == 2 and len(errors) == 1 and needle in errors[0], result.stderr[-2000:]
        assert "Traceback" not in result.stderr


def test_dataset_without_prompt_or_question_is_one_line(tmp_path):
    data = write_jsonl(tmp_path / "bad.jsonl", [{"text": "hi", "answer": "1"}])
    with pytest.raises(DataConfigError) as info:
        load_records(str(data))
    assert "\n" not in str(info.value) and "neither a 'prompt' column" in str(info.value)
    answerless = write_jsonl(tmp_path / "noanswer.jsonl", [{"prompt": "2 + 2 ="}])
    with pytest.raises(DataConfigError, match="no answer column"):
        load_records(str(answerless))
    assert load_records(str(answerless), require_answer=False)[0]["answer"] is None


def test_unscorable_completions_are_left_out_of_the_group():
    """Every reward None: TRL leaves the completion out of the group's mean and std and gives it 0."""
    out = RewardStack([lambda prompts, completions, **kw: [1.0, 0.0, None, 2.0]])(["p"] * 4, ["c"] * 4)
    assert out.scorable.tolist() == [True, True, False, True]
    token_rewards = torch.zeros(4, 3)
    token_rewards[:, -1] = out.total
    adv = grpo(token_rewards, torch.ones(4, 3), torch.zeros(4, dtype=torch.long), valid=out.scorable)[:, 0]
    kept = torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64)
    expected = (kept - kept.mean()) / (kept.std() + 1e-6)
    assert adv[[0, 1, 3]].double().tolist() == pytest.approx(expected.tolist(), abs=1e-6)
    assert adv[2] == 0


# --- our built-in rewards in every layout ----------------------------------------------------------

def test_builtin_rewards_agree_across_dataset_formats(tiny_model_path, tmp_path):
    """accuracy, format and REPRO give the same values for the same completion whether the problem
    comes as our question/answer columns, TRL's conversational or standard prompt, or verl's parquet."""
    tok = load_tokenizer(tiny_model_path)
    question, gold = QUESTIONS[0]
    messages = [{"role": "user", "content": question}]
    rendered = render_prompt(tok, messages)
    files = {
        "ours": write_jsonl(tmp_path / "ours.jsonl", [{"question": question, "answer": gold}]),
        "trl_conversational": write_jsonl(tmp_path / "conv.jsonl", [{"prompt": messages, "solution": gold}]),
        "trl_standard": write_jsonl(tmp_path / "std.jsonl", [{"prompt": rendered, "solution": gold}]),
        "verl": tmp_path / "verl.parquet",
    }
    pd.DataFrame(verl_rows(1)).to_parquet(files["verl"])
    records = {name: load_records(str(path))[0] for name, path in files.items()}
    prompts = {name: dataset_prompt(r, template="{question}") for name, r in records.items()}
    assert isinstance(prompts["trl_standard"], str) and isinstance(prompts["verl"], list)
    texts = {name: render_prompt(tok, p) for name, p in prompts.items()}
    assert set(texts.values()) == {rendered}  # the model sees the same prompt in every layout
    assert {r["answer"] for r in records.values()} == {gold}

    completion = "<think>\nWe add.\n2 + 3 = 5.\nCheck: 5.\n</think>\nSo \\boxed{5}"
    stack = RewardStack("accuracy,format")
    values = {}
    for name, record in records.items():
        columns = {k: [v] for k, v in record.items() if k != "prompt"}
        out = stack([prompts[name]], [completion], **columns)
        values[name] = {k: v.tolist() for k, v in out.components.items()}
    assert all(v == {"accuracy": [1.0], "format": [1.0]} for v in values.values()), values

    model = load_causal_lm(tiny_model_path)
    prompt_ids = tok(list(texts.values()), return_tensors="pt", add_special_tokens=False)["input_ids"]
    response = tok([completion] * 4, return_tensors="pt", add_special_tokens=False)["input_ids"]
    B, T = response.shape
    batch = RolloutBatch(prompt_ids=prompt_ids, prompt_mask=torch.ones_like(prompt_ids),
                         response_ids=response, response_mask=torch.ones_like(response),
                         logprobs=torch.zeros(B, T), entropies=torch.arange(T, dtype=torch.float32).repeat(B, 1),
                         group_ids=torch.arange(B))
    repro = ReproReward(ReproConfig(top_k=3))(model, tok, batch, [r["answer"] for r in records.values()])
    print({"accuracy/format": values, "repro final score": repro.final_score.tolist()})
    assert repro.reward_mask[0].sum() >= 2
    for row in range(1, 4):
        assert torch.equal(repro.token_rewards[row], repro.token_rewards[0])
        assert repro.final_score[row] == repro.final_score[0]
