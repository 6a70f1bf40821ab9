"""Rollout engines: turn prompts into a :class:`RolloutBatch`.

The HF engine batches ``model.generate`` with the KV cache and left padding. The behaviour
policy's log-prob of each sampled token and the entropy of each step's distribution are taken
from the scores generate already computes (a logits processor), so no extra forward pass runs.
Any engine with the same ``generate(model, prompts, num_generations, extras)`` method plugs in
(EAGER, vLLM).
"""
from __future__ import annotations

import time
import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from algos.batch import RolloutBatch
from algos.rollout.base import SamplingParams, mask_top_k_top_p, response_mask_from_ids, tokenize_prompts
from algos.rollout.sampler import sample_dropping_finished


class BehaviourStats(LogitsProcessor):
    """Records log π(chosen token) and the entropy of π at each step, then applies temperature,
    top-k and top-p itself (so the recorded distribution is the tempered, untruncated one the
    trainer's loss uses). The log-prob of step t's token is read at step t + 1 from input_ids."""

    def __init__(self, temperature: float, top_k: int, top_p: float):
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.logprobs: list[torch.Tensor] = []
        self.entropies: list[torch.Tensor] = []
        self._previous: torch.Tensor | None = None

    def _take_previous(self, tokens: torch.Tensor) -> None:
        if self._previous is not None:
            self.logprobs.append(self._previous.gather(1, tokens[:, None]).squeeze(1))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.entropies:  # input_ids now ends with the token sampled at the previous step
            self._take_previous(input_ids[:, -1])
        scaled = scores.float() / self.temperature
        logp = torch.log_softmax(scaled, dim=-1)
        self.entropies.append(-(logp.exp() * logp).nansum(dim=-1))
        self._previous = logp
        return mask_top_k_top_p(scaled, self.top_k, self.top_p)

    def finish(self, last_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._take_previous(last_tokens)
        return torch.stack(self.logprobs, dim=1), torch.stack(self.entropies, dim=1)


class HFGenerateEngine:
    """Batched sampling with the KV cache and left padding: by default our loop that drops
    finished rows (``algos.rollout.sampler``), or ``model.generate`` with ``drop_finished=False``."""

    def __init__(self, tokenizer, params: SamplingParams):
        self.tokenizer = tokenizer
        self.params = params
        eos = tokenizer.eos_token_id
        self.eos_ids = sorted({eos} if isinstance(eos, int) else set(eos))
        self.last_timing: dict[str, float] = {}

    def with_params(self, params: SamplingParams) -> "HFGenerateEngine":
        """An engine with other sampling settings (evaluation: greedy)."""
        return HFGenerateEngine(self.tokenizer, params)

    def tokenize_prompts(self, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
        return tokenize_prompts(self.tokenizer, prompts, self.params.max_prompt_length, device)

    def _generation_config(self, model) -> GenerationConfig:
        p = self.params
        return GenerationConfig(
            max_new_tokens=p.max_new_tokens, do_sample=p.do_sample, temperature=1.0, top_k=0,
            top_p=1.0, pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.eos_ids,
            use_cache=True)

    @torch.no_grad()
    def generate(self, model, prompts: list[str], num_generations: int = 1,
                 extras: dict[str, list] | None = None) -> RolloutBatch:
        p = self.params
        device = next(model.parameters()).device
        unique_ids, unique_mask = self.tokenize_prompts(prompts, device)
        prompt_ids = unique_ids.repeat_interleave(num_generations, dim=0)
        prompt_mask = unique_mask.repeat_interleave(num_generations, dim=0)
        total = prompt_ids.shape[0]
        chunk = p.batch_size or total
        config = self._generation_config(model)
        start = time.perf_counter()
        responses, logprobs, entropies = [], [], []
        was_training = model.training
        model.eval()
        try:
            for lo in range(0, total, chunk):
                ids, mask = prompt_ids[lo:lo + chunk], prompt_mask[lo:lo + chunk]
                if p.drop_finished:
                    whole_groups = lo % num_generations == 0 and len(ids) % num_generations == 0
                    repeats = num_generations if whole_groups else 1
                    if repeats > 1:  # whole groups: each prompt is prefilled once
                        group = slice(lo // repeats, (lo + len(ids)) // repeats)
                        ids, mask = unique_ids[group], unique_mask[group]
                    response, lp, ent = sample_dropping_finished(
                        model, ids, mask, max_new_tokens=p.max_new_tokens, eos_ids=self.eos_ids,
                        pad_id=self.tokenizer.pad_token_id, temperature=p.temperature, top_k=p.top_k,
                        top_p=p.top_p, do_sample=p.do_sample, repeats=repeats)
                else:
                    stats = BehaviourStats(p.temperature, p.top_k, p.top_p)
                    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                                         logits_processor=LogitsProcessorList([stats]))
                    response = out[:, prompt_ids.shape[1]:]
                    lp, ent = stats.finish(response[:, -1])
                responses.append(response)
                logprobs.append(lp)
                entropies.append(ent)
        finally:
            model.train(was_training)
        width = max(r.shape[1] for r in responses)
        pad = self.tokenizer.pad_token_id

        def right_pad(tensors, value):
            return torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)
                              for t in tensors], dim=0)

        response_ids = right_pad(responses, pad)
        response_mask, reasons = response_mask_from_ids(response_ids, self.eos_ids)
        logprobs_t = right_pad(logprobs, 0.0) * response_mask
        entropies_t = right_pad(entropies, 0.0) * response_mask
        self.last_timing = {"generation_seconds": time.perf_counter() - start,
                            "generated_tokens": float(response_mask.sum())}
        completions = self.decode(response_ids, response_mask)
        group_ids = torch.arange(len(prompts), device=device).repeat_interleave(num_generations)
        extras = {k: [v for v in vals for _ in range(num_generations)] for k, vals in (extras or {}).items()}
        return RolloutBatch(
            prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=response_ids,
            response_mask=response_mask, logprobs=logprobs_t, entropies=entropies_t,
            group_ids=group_ids, prompts=[q for q in prompts for _ in range(num_generations)],
            completions=completions, finish_reasons=reasons, extras=extras)

    def decode(self, response_ids: torch.Tensor, response_mask: torch.Tensor) -> list[str]:
        rows = [ids[: int(m.sum())].tolist() for ids, m in zip(response_ids, response_mask)]
        return self.tokenizer.batch_decode(rows, skip_special_tokens=True)
