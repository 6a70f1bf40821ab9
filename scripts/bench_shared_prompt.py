#!/usr/bin/env python
"""Benchmark the shared-prompt forward (``algos.shared_prompt``) against the row-by-row pass.

One GRPO group as the update sees it: a held-out thinking-task prompt rendered as the trainer
renders it (its default prompt template in the chat template) and ``--group`` completions of
seeded random lengths in [--min_len, --max_len], right-padded; forward + backward of the mean response log-prob (temperature 0.7, output layer
on the hidden states), timed ``--repeats`` times each way, alternating, median reported. Prints the
tokens each way runs, both medians, their ratio, the largest log-prob difference and the relative
difference of the gradients (both should be float rounding). ``--actor_critic shared|separate`` times
PPO's actor-critic instead (``algos.value_model.ActorCritic``; the loss adds the mean squared value),
whose policy pass shares the prompt, as a separate critic's backbone does. ``--bf16`` runs the passes under
bfloat16 autocast, as the trainer's ``--bf16`` does (fp32 weights).

Example:  python scripts/bench_shared_prompt.py --threads 2
          python scripts/bench_shared_prompt.py --threads 2 --actor_critic separate --bf16
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="hub id or directory (default: the embedded default model)")
    ap.add_argument("--group", type=int, default=8, help="completions of the prompt (GRPO's num_generations)")
    ap.add_argument("--min_len", type=int, default=80)
    ap.add_argument("--max_len", type=int, default=150)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bf16", action="store_true",
                    help="forward passes under bfloat16 autocast, as the trainer's --bf16 (fp32 weights)")
    ap.add_argument("--actor_critic", choices=("none", "shared", "separate"), default="none",
                    help="time PPO's actor-critic with this critic backbone instead of the policy alone")
    args = ap.parse_args()
    if args.group < 2 or not 1 <= args.min_len <= args.max_len:
        sys.exit("bench_shared_prompt: need --group >= 2 and 1 <= --min_len <= --max_len")

    import torch

    from algos.config import RLConfig
    from algos.data_formats import dataset_prompt, render_prompt
    from algos.logprobs import logprobs_from_hidden
    from algos.models import load_causal_lm, load_tokenizer, output_head
    from algos.shared_prompt import distinct_prompts, shared_prompt_forward
    from algos.thinking_task import ThinkingTask
    from algos.trainer import position_ids_from_mask
    from algos.value_model import ActorCritic

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tokenizer = load_tokenizer(args.model)
    model = load_causal_lm(args.model, dtype=torch.float32)
    head = output_head(model)
    model.train()
    record = ThinkingTask().generate(1, seed=args.seed, split="test")[0]
    config = RLConfig()
    text = render_prompt(tokenizer, dataset_prompt(record, config.prompt_template, None, True))
    prompt = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    B, P = args.group, prompt.shape[1]
    lengths = torch.randint(args.min_len, args.max_len + 1, (B,))
    R = int(lengths.max())
    mask = (torch.arange(R)[None] < lengths[:, None]).long()
    response = torch.randint(100, len(tokenizer) - 1, (B, R)) * mask + tokenizer.pad_token_id * (1 - mask)
    prompts, prompt_mask = prompt.expand(B, P), torch.ones(B, P, dtype=torch.long)
    actor_critic = None
    if args.actor_critic != "none":
        critic = load_causal_lm(args.model, dtype=torch.float32).get_decoder() if args.actor_critic == "separate" else None
        actor_critic = ActorCritic(model, critic)
        torch.nn.init.normal_(actor_critic.value_head.weight, std=0.02)  # a head at zero would get no gradient below it
        actor_critic.train()

    input_ids, full = torch.cat([prompts, response], dim=1), torch.cat([prompt_mask, mask], dim=1)
    positions, empty = position_ids_from_mask(full), torch.empty(0, dtype=torch.long)

    def row_by_row():
        if actor_critic is not None:
            out, values = actor_critic(input_ids, full, positions, R + 1, logits_to_keep=empty)
            return out.hidden_states[-1][:, -(R + 1):], values
        out = model(input_ids=input_ids, attention_mask=full, position_ids=positions, use_cache=False,
                    logits_to_keep=empty, output_hidden_states=True)
        return out.hidden_states[-1][:, -(R + 1):], None

    def shared():
        if actor_critic is not None:
            split = (prompts, prompt_mask, response, mask, distinct_prompts(prompts, prompt_mask))
            out, values = actor_critic(input_ids, full, positions, R + 1, logits_to_keep=empty, split=split)
            return out.hidden_states[-1], values
        return shared_prompt_forward(model, prompts, prompt_mask, response, mask).hidden_states[-1], None

    trained = actor_critic if actor_critic is not None else model

    def run(forward):
        trained.zero_grad(set_to_none=True)
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            hidden, values = forward()
            logp = logprobs_from_hidden(hidden[:, :-1], head, response, temperature=0.7) * mask
            loss = logp.sum() / mask.sum()
            if values is not None:
                loss = loss + (values[:, :-1].square() * mask).sum() / mask.sum()
        loss.backward()
        seconds = time.perf_counter() - start
        grad = torch.cat([p.grad.flatten() for p in trained.parameters() if p.grad is not None])
        return seconds, logp.detach(), grad

    _, logp_a, grad_a = run(row_by_row)  # warm-up, and the values compared
    _, logp_b, grad_b = run(shared)
    times = {"row by row": [], "shared prompt": []}
    for _ in range(args.repeats):
        times["row by row"].append(run(row_by_row)[0])
        times["shared prompt"].append(run(shared)[0])
    a, b = (statistics.median(times[k]) for k in times)
    what = "policy" if actor_critic is None else f"actor-critic ({args.actor_critic} critic)"
    print(f"model {args.model or 'default'} | {what} | {B} completions of one prompt | prompt {P} tokens | "
          f"completions {int(lengths.min())}-{R} tokens | threads {torch.get_num_threads()}"
          f"{' | bf16 autocast' if args.bf16 else ''}")
    passes = 2 if args.actor_critic == "separate" else 1  # a separate critic's backbone runs the rows again
    print(f"row by row:    {passes * B * (P + R):5d} tokens  fwd+bwd {a:.2f} s")
    print(f"shared prompt: {passes * (P + B * R):5d} tokens  fwd+bwd {b:.2f} s")
    print(f"speed-up {a / b:.2f}x | max |log-prob diff| {float((logp_a - logp_b).abs().max()):.1e} | "
          f"gradient relative diff {float((grad_a - grad_b).norm() / grad_a.norm()):.1e}")


if __name__ == "__main__":
    main()
