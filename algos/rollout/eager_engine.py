"""EAGER as a rollout engine: variable-size groups for GRPO / REINFORCE++-baseline.

``num_generations`` is EAGER's cap M. Each prompt's group is its branching tree (EAGER-init), plus
re-rolled trees for prompts the reallocation favours: 'adapt' (cap-hitting prompts) or 'full'
(prompts whose group has no correct completion according to the verifier; in training the reward
stack is the verifier, so all-zero groups get more rollouts).

On-policy note: fork tokens are the deterministic top-1 / top-2 and children share their parent's
prefix, so a group's completions are neither independent nor exact samples of the policy. The
behaviour log-probs stored in the batch are the policy's real log-probs of the chosen tokens (the
tempered distribution the loss uses), so the importance ratio is exact for the tokens taken; the
estimator stays biased by the choice of tokens (deterministic forks) and the tree-shaped groups.
``sample_fork`` draws both fork tokens from the policy without replacement, which removes the
deterministic choice but not the dependence.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from algos.batch import RolloutBatch
from algos.rollout.eager import EagerParams
from algos.rollout.eager_budget import eager_sample
from algos.rollout import HFGenerateEngine, SamplingParams

# (prompt, completions, completion token ids, the prompt's extras) -> correct per completion
RolloutVerifier = Callable[[str, list[str], list[list[int]], dict], list[bool]]


@dataclass
class EagerSettings:
    mode: str = "full"              # init | adapt | full | parallel
    threshold: float = 2.0
    entropy_top_k: int = 20
    quiet_steps: int = 1000
    dynamic_threshold: bool = False
    sample_fork: bool = False


def end_think_ids(tokenizer, marker: str = "</think>") -> list[list[int]]:
    """Token-id spellings of the end-of-thinking marker (what ``eager_generate`` takes): its id when
    the vocabulary has it as one token (thinking models), else its encodings alone and after a space
    (SmolLM2's BPE: '</' 'think' '>' and ' </' 'think' '>'; a marker after a line break ends with the first)."""
    token_id = tokenizer.convert_tokens_to_ids(marker)
    if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
        return [[token_id]]
    spellings = []
    for text in (marker, " " + marker):
        ids = tokenizer.encode(text, add_special_tokens=False)
        if ids and ids not in spellings:
            spellings.append(ids)
    return spellings


class EagerEngine(HFGenerateEngine):
    def __init__(self, tokenizer, params: SamplingParams, settings: EagerSettings,
                 verifier: RolloutVerifier | None = None, seed: int | None = None):
        super().__init__(tokenizer, params)
        self.settings = settings
        self.verifier = verifier
        self.seed, self.generator = seed, None  # made on the model's device at the first call
        self.end_think = end_think_ids(tokenizer)

    def eager_params(self, num_generations: int) -> EagerParams:
        p, s = self.params, self.settings
        return EagerParams(max_sequences=num_generations, threshold=s.threshold, entropy_top_k=s.entropy_top_k,
                           quiet_steps=s.quiet_steps, dynamic_threshold=s.dynamic_threshold,
                           sample_fork=s.sample_fork, max_new_tokens=p.max_new_tokens,
                           temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, do_sample=p.do_sample)

    @torch.no_grad()
    def generate(self, model, prompts: list[str], num_generations: int = 1,
                 extras: dict[str, list] | None = None) -> RolloutBatch:
        device = next(model.parameters()).device
        if self.seed is not None and (self.generator is None or self.generator.device.type != device.type):
            self.generator = torch.Generator(device=device).manual_seed(self.seed)
        extras = extras or {}
        prompt_ids, prompt_mask = self.tokenize_prompts(prompts, device)
        verifier = None
        if self.settings.mode == "full":
            if self.verifier is None:
                raise ValueError("EAGER mode 'full' needs a verifier (the trainer passes its reward stack)")

            def verifier(q, seqs):
                ids = [s.token_ids for s in seqs]
                texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
                return self.verifier(prompts[q], texts, ids, {k: v[q] for k, v in extras.items()})

        start = time.perf_counter()
        was_training = model.training
        model.eval()
        try:
            result = eager_sample(model, prompt_ids, prompt_mask, self.eager_params(num_generations),
                                  self.eos_ids, self.settings.mode, verifier, self.end_think, self.generator)
        finally:
            model.train(was_training)
        seqs = sorted(result.sequences, key=lambda s: s.prompt_index)  # stable: creation order in a group
        width = max(len(s.token_ids) for s in seqs)
        pad = self.tokenizer.pad_token_id

        def table(values, fill, dtype):
            return torch.tensor([v + [fill] * (width - len(v)) for v in values], dtype=dtype, device=device)

        response_ids = table([s.token_ids for s in seqs], pad, torch.long)
        response_mask = table([[1] * len(s.token_ids) for s in seqs], 0, torch.long)
        logprobs = table([s.logprobs for s in seqs], 0.0, torch.float32)
        entropies = table([s.entropies for s in seqs], 0.0, torch.float32)
        group = torch.tensor([s.prompt_index for s in seqs], device=device)
        self.last_timing = {"generation_seconds": time.perf_counter() - start,
                            "generated_tokens": float(response_mask.sum()),
                            "sequences_per_prompt": len(seqs) / len(prompts)}
        return RolloutBatch(
            prompt_ids=prompt_ids[group], prompt_mask=prompt_mask[group], response_ids=response_ids,
            response_mask=response_mask, logprobs=logprobs, entropies=entropies, group_ids=group,
            prompts=[prompts[s.prompt_index] for s in seqs], completions=self.decode(response_ids, response_mask),
            finish_reasons=[s.finish_reason for s in seqs],
            extras={k: [v[s.prompt_index] for s in seqs] for k, v in extras.items()})
