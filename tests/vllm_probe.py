"""Measures a colocated vLLM engine against the trainer's forward pass; run in its own process (one
vLLM engine per process) by tests/test_vllm.py, which asserts on the JSON it prints last.

    python tests/vllm_probe.py TEMPERATURE [--sync]

1. Rollouts at TEMPERATURE (fp32 engine): |vLLM log-prob - trainer log-prob| of the sampled tokens.
2. --sync: one optimizer step with a large learning rate on a fixed completion, then the engine's
   log-probs of that completion (``score_logprobs``) before and after the sync, against the old and
   the updated policy; first with full weights, then with a LoRA adapter on a fresh copy of the model.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from algos.data import build_prompt  # noqa: E402
from algos.logprobs import logprobs_from_logits  # noqa: E402
from algos.models import load_causal_lm, load_tokenizer, resolve_model_path  # noqa: E402
from algos.rollout import SamplingParams  # noqa: E402
from algos.rollout.vllm_engine import VLLMEngine, VLLMSettings, score_logprobs  # noqa: E402


def trainer_logprobs(model, prompt_ids, prompt_mask, response_ids, response_mask, temperature):
    ids = torch.cat([prompt_ids, response_ids], 1)
    mask = torch.cat([prompt_mask, response_mask], 1)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    logits = logits[:, prompt_ids.shape[1] - 1:-1].float() / temperature
    return logprobs_from_logits(logits, response_ids) * response_mask


def step_on(model, sequence: torch.Tensor, start: int, lr: float) -> None:
    """One Adam step that raises the log-likelihood of ``sequence[start:]`` (a large, visible change)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    ids = sequence[None]
    logits = model(input_ids=ids).logits[:, start - 1:-1].float()
    loss = -logprobs_from_logits(logits, ids[:, start:]).mean()
    loss.backward()
    opt.step()
    opt.zero_grad()


@torch.no_grad()
def policy_scores(model, sequence: torch.Tensor, start: int) -> torch.Tensor:
    ids = sequence[None]
    logits = model(input_ids=ids).logits[:, start - 1:-1].float()
    return logprobs_from_logits(logits, ids[:, start:])[0]


def main() -> None:
    temperature = float(sys.argv[1])
    torch.manual_seed(0)
    tokenizer = load_tokenizer(None)
    model = load_causal_lm(None)
    path = resolve_model_path(None)
    engine = VLLMEngine(tokenizer, SamplingParams(max_new_tokens=48, temperature=temperature),
                        VLLMSettings(dtype="float32", seed=0, max_num_seqs=32), path, model.config)
    prompts = [build_prompt(tokenizer, f"What is {a} + {b}?", "{question}\nAnswer in \\boxed{{}}.")
               for a, b in ((3, 4), (12, 30), (7, 9), (21, 5))]
    batch = engine.generate(model, prompts, 4)
    with torch.no_grad():
        mine = trainer_logprobs(model, batch.prompt_ids, batch.prompt_mask, batch.response_ids,
                                batch.response_mask, temperature)
    valid = batch.response_mask.bool()
    diff = (mine - batch.logprobs).abs()[valid]
    report = {"temperature": temperature, "tokens": int(valid.sum()), "max_abs_diff": float(diff.max()),
              "mean_abs_diff": float(diff.mean()),
              "mean_abs_logprob": float(batch.logprobs.abs()[valid].mean()),
              "stop_rows_end_with_eos": all(
                  int(ids[int(m.sum()) - 1]) in engine.eos_ids
                  for ids, m, r in zip(batch.response_ids, batch.response_mask, batch.finish_reasons) if r == "stop"),
              "finish_reasons": sorted(set(batch.finish_reasons))}
    if "--sync" in sys.argv:
        row = int(batch.response_mask.sum(1).argmax())
        prompt = batch.prompt_ids[row][batch.prompt_mask[row].bool()]
        completion = batch.response_ids[row][: int(batch.response_mask[row].sum())]
        sequence, start = torch.cat([prompt, completion]), len(prompt)
        for kind in ("full", "lora"):
            policy = load_causal_lm(None)
            if kind == "lora":
                from peft import LoraConfig, get_peft_model

                policy = get_peft_model(policy, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
            engine.sync_weights(policy)  # the engine starts from the current policy
            old = policy_scores(policy, sequence, start)
            step_on(policy, sequence, start, lr=1e-3 if kind == "full" else 1e-2)
            new = policy_scores(policy, sequence, start)
            before = torch.tensor(score_logprobs(engine, [sequence.tolist()], start)[0])
            engine.mark_stale()
            engine.generate(policy, prompts[:1], 1)  # a rollout pushes the changed weights first
            after = torch.tensor(score_logprobs(engine, [sequence.tolist()], start)[0])
            report[kind] = {"policy_change": float((new - old).abs().mean()),
                            "before_vs_old": float((before - old).abs().max()),
                            "after_vs_new": float((after - new).abs().max()),
                            "after_vs_old": float((after - old).abs().mean()),
                            "sync_seconds": engine.shared.last_sync_seconds}
    print("VLLM_PROBE " + json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
