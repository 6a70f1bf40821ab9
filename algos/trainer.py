"""The RL trainer on Accelerate: GRPO, PPO, REINFORCE++ and REINFORCE++-baseline.

One step: sample a rollout batch and score it (with dynamic sampling: rounds until the step has
its informative groups) -> reference log-probs (only when the KL coefficient is > 0) -> values
(PPO) -> advantages -> ``num_iterations`` passes of mini-batches with gradient accumulation and
clipping -> logs -> checkpoint. The math lives in pure functions chosen through registries
(``algos.advantages.ADVANTAGE_ESTIMATORS``, ``algos.losses.POLICY_LOSSES``, ``algos.kl``); this
module composes them. With several processes, every batch statistic (loss denominators,
whitening, batch baselines) is the global batch's: each process's loss is its share of the global
aggregate, so N processes compute the gradient of one process holding the whole batch.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

from algos.advantages import ADVANTAGE_ESTIMATORS, ESTIMATOR_FOR_ALGORITHM
from algos.batch import RolloutBatch, concat_batches
from algos.checkpoint import load_checkpoint, load_trainer_state, resolve_resume, save_checkpoint
from algos.config import RLConfig
from algos.data import SYNTHETIC_TASKS, ArithmeticTask, load_records
from algos.data_formats import dataset_prompt, render_prompt
from algos.deepspeed_setup import (accelerator_placement, fill_deepspeed_config, gathered_for_generation,
                                   prepare_frozen_model)
from algos.device import cpu_has_fast_bf16
from algos.dynamic_sampling import first_groups, informative_groups
from algos.evaluation import evaluate_accuracy
from algos.importance import engine_is_weights
from algos.kl import kl_estimate
from algos.logprobs import logits_to_keep, response_logprobs
from algos.losses import aggregate, aggregation_denominator, policy_loss, value_loss
from algos.micro_batching import token_budget_batches
from algos.models import load_causal_lm, load_model_config, load_tokenizer, output_head, resolve_model_path
from algos.rollout import HFGenerateEngine, SamplingParams
from algos.shared_prompt import distinct_prompts, shared_prompt_forward
from algos.tracking import RunTracker
from algos.value_model import ActorCritic


_LOSS_KEYS = ("loss/policy", "kl", "loss/value")


@dataclasses.dataclass
class UpdateInputs:
    """What the update needs besides the batch, all (B, T) (None where not computed)."""
    advantages: torch.Tensor
    loss_mask: torch.Tensor
    old_logp: torch.Tensor | None
    ref_logp: torch.Tensor | None
    old_values: torch.Tensor | None
    returns: torch.Tensor | None


def _select_rewards(rewards, rows: list[int]):
    from rewards import RewardOutput

    return RewardOutput(total=rewards.total[rows], components={k: v[rows] for k, v in rewards.components.items()})


def _concat_rewards(parts):
    from rewards import RewardOutput

    if len(parts) == 1:
        return parts[0]
    return RewardOutput(total=torch.cat([p.total for p in parts]),
                        components={k: torch.cat([p.components[k] for p in parts]) for k in parts[0].components})


def micro_batches(rows: list[int], count: int) -> list[list[int]]:
    """``rows`` in ``count`` consecutive micro-batches (sizes differ by at most one; any empty
    ones first, so the last micro-batch, where gradients synchronise, always has rows)."""
    parts = [part.tolist() for part in torch.tensor_split(torch.tensor(rows, dtype=torch.long), count)]
    return sorted(parts, key=len)


class PromptSampler:
    """Deterministic, resumable prompt order: epoch e is a seeded permutation of the records;
    the position is a single counter of prompts handed out (over all processes)."""

    def __init__(self, num_records: int, seed: int):
        self.num_records, self.seed = num_records, seed
        self._epoch, self._order = -1, None

    def indices(self, start: int, count: int) -> list[int]:
        out = []
        for position in range(start, start + count):
            epoch, offset = divmod(position, self.num_records)
            if epoch != self._epoch:
                g = torch.Generator().manual_seed(self.seed * 1000 + epoch)
                self._order = torch.randperm(self.num_records, generator=g).tolist()
                self._epoch = epoch
            out.append(self._order[offset])
        return out


def use_cpu_threads(num_processes: int) -> None:
    """On CPU, give each process cores / processes threads. `accelerate launch` sets
    OMP_NUM_THREADS=1, which leaves a single-process run on one core; REPRO_RL_NUM_THREADS
    overrides the choice."""
    wanted = os.environ.get("REPRO_RL_NUM_THREADS")
    threads = int(wanted) if wanted else max(1, (os.cpu_count() or 1) // num_processes)
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)


def trim_padding(batch: RolloutBatch):
    """(prompt_ids, prompt_mask, response_ids, response_mask) without the prompt columns that are
    left padding in every row and the response columns past the longest response. The cut columns
    are masked for every row, so the kept positions' outputs are unchanged."""
    used_prompt = batch.prompt_mask.bool().any(dim=0).nonzero()
    start = int(used_prompt[0]) if len(used_prompt) else 0
    used_response = batch.response_mask.bool().any(dim=0).nonzero()
    end = int(used_response[-1]) + 1 if len(used_response) else 1
    return (batch.prompt_ids[:, start:], batch.prompt_mask[:, start:],
            batch.response_ids[:, :end], batch.response_mask[:, :end])


def length_buckets(rows: list[int], lengths: list[float], min_fill: float = 0.75) -> list[list[int]]:
    """``rows`` cut into buckets of similar length, longest first: a bucket takes rows while they
    are at least ``min_fill`` x its longest row, so at most 1 - min_fill of a bucket's positions
    are padding (min_fill = 0: one bucket)."""
    buckets, top = [], 0.0
    for i in sorted(range(len(rows)), key=lambda i: -lengths[i]):
        if not buckets or lengths[i] < min_fill * top:
            buckets.append([])
            top = lengths[i]
        buckets[-1].append(rows[i])
    return buckets


def rows_by_length(lengths: torch.Tensor) -> list[int]:
    """Row indices ordered by length (stable), so consecutive micro-batches hold similar lengths."""
    return torch.argsort(lengths, stable=True).tolist()


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding: cumsum(mask) - 1, clamped at 0."""
    return (mask.long().cumsum(dim=1) - 1).clamp(min=0)


class RLTrainer:
    def __init__(self, config: RLConfig, reward_stack=None):
        self.config = c = config
        if not c.output_dir:
            c.output_dir = str(Path("runs") / c.algorithm)
        # cpu=True without CUDA: `accelerate launch --multi_gpu --num_processes 2` then runs
        # data-parallel on CPU over gloo instead of N unrelated single-process runs; a DeepSpeed
        # launch on the CPU gets cpu=False and gloo instead (algos.deepspeed_setup).
        if c.bf16 and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
            from algos.device import DeviceError
            raise DeviceError("--bf16 (on by default) needs a GPU with bfloat16 (Ampere or newer): "
                              "pass --bf16 false")
        self.accelerator = Accelerator(gradient_accumulation_steps=c.gradient_accumulation_steps,
                                       mixed_precision="bf16" if c.bf16 else "no",
                                       **accelerator_placement())
        set_seed(c.seed, device_specific=True)
        acc = self.accelerator
        if acc.device.type == "cpu":
            use_cpu_threads(acc.num_processes)
        self.log_main(f"[repro-rl] {c.algorithm} on {acc.num_processes} process(es), "
                      f"device {acc.device}, outputs -> {c.output_dir}")
        if c.bf16 and acc.device.type == "cpu" and not cpu_has_fast_bf16():
            self.log_main("[repro-rl] warning: --bf16 on a CPU without AVX-512 emulates bfloat16, about 27x "
                          "slower than float32; pass --bf16 false")

        # Data and rewards first: a bad dataset or reward spec fails before the model loads.
        self.train_records, self.eval_records = self._load_data()
        self.sampler = PromptSampler(len(self.train_records), c.seed)
        if reward_stack is None:
            from rewards import RewardStack

            from rewards.overlong import soft_overlong_punishment

            weights = [float(w) for w in c.reward_weights.split(",")] if c.reward_weights else None
            specs = [soft_overlong_punishment(c.max_completion_length, c.overlong_buffer, c.overlong_penalty_factor)
                     if name == "overlong" else name for name in c.outcome_rewards]
            reward_stack = RewardStack(specs, weights)
        self.rewards = reward_stack
        self.repro = None
        if c.use_repro:
            from rewards.repro import ReproConfig, ReproReward

            self.repro = ReproReward(ReproConfig(
                top_k=c.repro_top_k, stability_weight=c.repro_stability_weight,
                ema=c.repro_ema or None, answer_template=c.repro_answer_template,
                think_end_marker=c.repro_think_end_marker or None,
                micro_batch_size=c.repro_micro_batch_size))

        sampling = SamplingParams(max_new_tokens=c.max_completion_length, temperature=c.temperature,
                                  top_p=c.top_p, top_k=c.top_k, max_prompt_length=c.max_prompt_length,
                                  batch_size=c.generation_batch_size, drop_finished=c.drop_finished_sequences)
        if c.use_vllm:  # vLLM missing, an unsupported model or too short a context: one line, before loading
            from algos.rollout.vllm_engine import check_settings

            check_settings(load_model_config(c.model_name_or_path), sampling, self._vllm_settings())

        # Model, tokenizer, reference, critic --------------------------------------------------
        self.tokenizer = load_tokenizer(c.model_name_or_path)
        policy = self._load_policy()
        # The KL reference (LoRA's is the base model with the adapters off) and a separate critic's
        # backbone are loaded again, not deep-copied: under ZeRO-3 deep copies end up with
        # zero-element parameters.
        self.ref_model = None
        if c.kl_coef > 0 and not c.use_peft:
            self.ref_model = load_causal_lm(c.model_name_or_path, dtype=torch.float32)
        model = policy
        if c.algorithm == "ppo":
            critic = None if c.critic_backbone == "shared" else self._load_policy().get_decoder()
            model = ActorCritic(policy, critic)

        # Optimiser and schedule -----------------------------------------------------------------
        if c.algorithm == "ppo":
            groups = [{"params": [p for p in model.policy.parameters() if p.requires_grad],
                       "lr": c.learning_rate},
                      {"params": model.critic_parameters(), "lr": c.critic_learning_rate}]
        else:
            groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": c.learning_rate}]
        # The fused kernel (one pass per tensor; TRL's default optimizer too) on CPU and CUDA.
        optimizer = torch.optim.AdamW(groups, lr=c.learning_rate, weight_decay=c.weight_decay,
                                      betas=(c.adam_beta1, c.adam_beta2),
                                      fused=acc.device.type in ("cpu", "cuda"))
        self.total_optimizer_steps = c.max_steps * c.num_iterations * c.steps_per_generation
        # Stepped by hand once per optimizer step (not through accelerate.prepare, which would
        # advance it once per process).
        self.scheduler = get_scheduler(c.lr_scheduler_type, optimizer, num_warmup_steps=c.warmup_steps,
                                       num_training_steps=self.total_optimizer_steps)
        fill_deepspeed_config(acc, c.per_device_train_batch_size, c.gradient_accumulation_steps)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        if self.ref_model is not None:  # after prepare: DeepSpeed's config is complete by then
            self.ref_model = prepare_frozen_model(self.ref_model, acc)
        acc.register_for_checkpointing(self.scheduler)

        if c.use_vllm:
            self.engine = self._vllm_engine(sampling)
            self.eval_engine = self.engine
        else:
            self.eval_engine = HFGenerateEngine(self.tokenizer, sampling)
            self.engine = self.eval_engine if c.rollout == "hf" else self._eager_engine(sampling)
        # vLLM reports no entropies: a forward pass before the update measures them when REPRO ranks by
        # them (or a KL joins the reward); otherwise the update's own forward pass logs them.
        self.engine_entropies = getattr(self.engine, "provides_entropies", True)
        # Micro-batches run as length buckets (less padding), except under DeepSpeed, whose engine
        # expects one backward per micro-step.
        self.bucket_min_fill = 0.75 if getattr(acc.state, "deepspeed_plugin", None) is None else 0.0
        self.step = 0
        self.prompts_consumed = 0
        self.entropy_in_update = False
        self.scoring_seconds = 0.0  # the reward stack's time this step (it runs inside sampling)
        self.tracker = None
        if acc.is_main_process:
            self.tracker = RunTracker(c.output_dir, c.report_to, c.run_name or Path(c.output_dir).name,
                                      c.wandb_project, dataclasses.asdict(c))

    def _load_policy(self):
        """The policy as configured: fp32 master weights (--bf16 runs forward passes under bf16
        autocast, through Accelerate), activation checkpointing, LoRA adapters."""
        c = self.config
        policy = load_causal_lm(c.model_name_or_path, dtype=torch.float32)
        policy.config.use_cache = True
        if c.gradient_checkpointing:
            # transformers >= 5.2x names it activation checkpointing (the old name warns); 5.19 has only the old
            if hasattr(policy, "activation_checkpointing_enable"):
                policy.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if not c.use_peft:
            return policy
        from peft import LoraConfig, get_peft_model

        targets = c.lora_target_modules
        lora = LoraConfig(r=c.lora_r, lora_alpha=c.lora_alpha, lora_dropout=c.lora_dropout,
                          target_modules=targets if targets == "all-linear" else targets.split(","),
                          task_type="CAUSAL_LM")
        if c.gradient_checkpointing:
            policy.enable_input_require_grads()
        return get_peft_model(policy, lora)

    # ------------------------------------------------------------------------------------------
    def log_main(self, text: str) -> None:
        if self.accelerator.is_main_process:
            print(text, flush=True)

    def _vllm_settings(self):
        from algos.rollout.vllm_engine import VLLMSettings, enforce_eager_setting

        c = self.config
        dtype = c.vllm_dtype if c.vllm_dtype != "auto" else ("bfloat16" if c.bf16 else "float32")
        return VLLMSettings(mode=c.vllm_mode, gpu_memory_utilization=c.vllm_gpu_memory_utilization,
                            enable_sleep_mode=c.vllm_enable_sleep_mode, max_model_len=c.vllm_max_model_len,
                            dtype=dtype, seed=c.seed + self.accelerator.process_index,
                            max_num_seqs=max(c.rollout_batch_size, c.eval_batch_size),
                            enforce_eager=enforce_eager_setting(c.vllm_enforce_eager))

    def _vllm_engine(self, sampling: SamplingParams):
        from algos.rollout.vllm_engine import VLLMEngine

        acc = self.accelerator
        self.log_main("[repro-rl] starting a colocated vLLM engine in each process")
        if self.config.vllm_enable_sleep_mode and not torch.cuda.is_available():
            self.log_main("[repro-rl] --vllm_enable_sleep_mode frees GPU memory; it has no effect on CPU")
        return VLLMEngine(self.tokenizer, sampling, self._vllm_settings(),
                          resolve_model_path(self.config.model_name_or_path), self.policy.config,
                          acc.process_index, acc.num_processes)

    def _policy_changed(self) -> None:
        """An optimizer step or a resume changed the weights: the engine re-syncs before sampling."""
        if hasattr(self.engine, "mark_stale"):
            self.engine.mark_stale()

    def _eager_engine(self, sampling: SamplingParams):
        from algos.rollout.eager_engine import EagerEngine, EagerSettings

        c = self.config
        settings = EagerSettings(mode=c.eager_mode, threshold=c.eager_threshold,
                                 entropy_top_k=c.eager_entropy_top_k, quiet_steps=c.eager_quiet_steps,
                                 dynamic_threshold=c.eager_dynamic_threshold, sample_fork=c.eager_sample_fork)
        return EagerEngine(self.tokenizer, sampling, settings, verifier=self._verify_group)

    def _verify_group(self, prompt: str, completions: list[str], completion_ids: list[list[int]],
                      extras: dict) -> list[bool]:
        """Full EAGER's verifier: a completion is correct when its 'accuracy' reward (or, without
        one, its total reward) is > 0."""
        n = len(completions)
        out = self.reward([prompt] * n, completions, completion_ids, {k: [v] * n for k, v in extras.items()})
        scores = out.components.get("accuracy", out.total)
        return [bool(x > 0) for x in scores.tolist()]

    def _load_data(self) -> tuple[list[dict], list[dict]]:
        c = self.config
        task = ArithmeticTask(c.arithmetic_digits, c.arithmetic_operands, c.arithmetic_operators,
                              c.arithmetic_test_fraction)
        if c.dataset in SYNTHETIC_TASKS:
            train = load_records(c.dataset, "train", c.num_train_samples, c.seed, arithmetic=task)
            held_out = (load_records(c.dataset, "test", c.num_eval_samples, c.seed, arithmetic=task)
                        if c.num_eval_samples else [])
            return train, held_out
        needs_answer = "accuracy" in c.outcome_rewards or c.use_repro or c.num_eval_samples > 0
        records = load_records(c.dataset, c.dataset_split, None, c.seed,
                               c.question_column, c.answer_column, require_answer=needs_answer)
        if len(records) <= c.num_eval_samples:
            from algos.data import DataConfigError

            raise DataConfigError(f"dataset '{c.dataset}' has {len(records)} records, not more than "
                                  f"--num_eval_samples={c.num_eval_samples}")
        held_out = records[len(records) - c.num_eval_samples:]
        train = records[: len(records) - c.num_eval_samples][: c.num_train_samples]
        return train, held_out

    def dataset_prompt(self, record: dict):
        """The record's prompt in TRL's format (chat messages or text; ``algos.data_formats``)."""
        c = self.config
        chat = c.use_chat_template and bool(getattr(self.tokenizer, "chat_template", None))
        return dataset_prompt(record, c.prompt_template, c.system_prompt or None, chat)

    def prompt_text(self, record: dict) -> str:
        """The model's input text for a record."""
        return render_prompt(self.tokenizer, self.dataset_prompt(record))

    @property
    def policy(self):
        """The unwrapped policy (for generation and saving)."""
        unwrapped = self.accelerator.unwrap_model(self.model)
        return unwrapped.policy if isinstance(unwrapped, ActorCritic) else unwrapped

    # One step ---------------------------------------------------------------------------------
    def next_prompts(self) -> tuple[list[str], dict[str, list]]:
        acc, c = self.accelerator, self.config
        per_device = c.prompts_per_device
        idx = self.sampler.indices(self.prompts_consumed, per_device * acc.num_processes)
        self.prompts_consumed += per_device * acc.num_processes
        mine = idx[acc.process_index * per_device:(acc.process_index + 1) * per_device]
        return self.prompt_batch(mine)

    def prompt_batch(self, indices: list[int]) -> tuple[list[str], dict[str, list]]:
        """The model's input texts for these training records, and their columns as rollout extras
        (with ``dataset_index`` and the TRL-format ``prompt``)."""
        records = [self.train_records[i] for i in indices]
        extras = {k: [r.get(k) for r in records] for k in records[0]}
        extras["dataset_index"] = list(indices)
        extras["prompt"] = [self.dataset_prompt(r) for r in records]
        return [render_prompt(self.tokenizer, p) for p in extras["prompt"]], extras

    def rollout(self, prompts: list[str], extras: dict[str, list]) -> RolloutBatch:
        # One autocast region around the whole rollout: under --bf16 each weight is cast to bf16
        # once per rollout (autocast caches casts until its outermost region exits) instead of
        # once per decode step; the numbers are the same.
        with self.accelerator.autocast(), self.gathered_for_generation():
            batch = self.engine.generate(self.policy, prompts, self.config.num_generations, extras)
        if hasattr(self.engine, "sleep"):  # vLLM sleep mode (CUDA): free its memory during the update
            self.engine.sleep()
        return batch

    def gathered_for_generation(self):
        """Under ZeRO-3, the policy's parameters gathered once for a whole generation by our own
        decoders (vLLM holds its own copy, synced block by block)."""
        c = self.config
        return gathered_for_generation(self.model, self.accelerator, c.ds3_gather_for_generation and not c.use_vllm)

    def forward(self, model, batch: RolloutBatch, with_entropy: bool = False):
        """Per-token log-probs of the response tokens (tempered logits), values for PPO and, when asked,
        the entropy of each step's tempered distribution (detached), all (B, T) or None. Columns that
        are padding in every row are cut before the pass (``trim_padding``)
        and the outputs padded back with zeros. With ``logprobs_chunk_size`` the model returns its
        last hidden states, not logits, and the output layer runs a chunk of tokens at a time
        (``algos.logprobs.logprobs_from_hidden``)."""
        c = self.config
        prompt_ids, prompt_mask, response_ids, response_mask = trim_padding(batch)
        input_ids = torch.cat([prompt_ids, response_ids], dim=1)
        mask = torch.cat([prompt_mask, response_mask], dim=1)
        positions = position_ids_from_mask(mask)
        keep = response_ids.shape[1] + 1
        unwrapped = self.accelerator.unwrap_model(model)
        actor_critic = isinstance(unwrapped, ActorCritic)
        head = output_head(unwrapped.policy if actor_critic else unwrapped) if c.logprobs_chunk_size else None
        keep_arg = logits_to_keep(keep, head is not None, input_ids.device)
        values = None
        prompts = self._shared_prompts(head, prompt_ids, prompt_mask)
        if actor_critic:
            split = (prompt_ids, prompt_mask, response_ids, response_mask, prompts) if prompts else None
            out, values = model(input_ids, mask, positions, keep, logits_to_keep=keep_arg, split=split)
            values = values[:, :-1]
        elif prompts:
            out = shared_prompt_forward(model, prompt_ids, prompt_mask, response_ids, response_mask, prompts)
        else:
            out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                        logits_to_keep=keep_arg, use_cache=False, output_hidden_states=head is not None)
        # The output layer outside the model's forward runs under the same autocast (--bf16) as inside it.
        with self.accelerator.autocast():
            logp, entropy = response_logprobs(out, head, response_ids, temperature=c.temperature,
                                              chunk_size=c.logprobs_chunk_size, with_entropy=with_entropy)
        entropy = entropy * response_mask if entropy is not None else None
        cut = batch.response_ids.shape[1] - response_ids.shape[1]
        if cut:
            logp = torch.nn.functional.pad(logp, (0, cut))
            values = torch.nn.functional.pad(values, (0, cut)) if values is not None else None
            entropy = torch.nn.functional.pad(entropy, (0, cut)) if entropy is not None else None
        return logp, values, entropy

    def _shared_prompts(self, head, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor):
        """``distinct_prompts`` of the rows when ``forward`` runs each distinct prompt once
        (``algos.shared_prompt``), else None: asked for, the output layer runs outside the model
        (hidden states), the model keeps a KV cache in training (activation checkpointing turns it
        off), and rows repeat a prompt."""
        c = self.config
        if not c.shared_prompt_forward or head is None or c.gradient_checkpointing:
            return None
        prompts = distinct_prompts(prompt_ids, prompt_mask)
        return prompts if len(prompts[0]) < len(prompt_ids) else None

    @torch.no_grad()
    def _batched_forward(self, model, batch: RolloutBatch, with_entropy: bool = False):
        """``forward`` over the batch in micro-batches of rows of similar length (less padding):
        (log-probs, values or None, entropies or None)."""
        size = self.config.per_device_train_batch_size
        order = rows_by_length(batch.attention_mask.sum(dim=1))
        outs = [self.forward(model, batch.select(order[lo:lo + size]), with_entropy)
                for lo in range(0, len(batch), size)]
        back = torch.argsort(torch.tensor(order))
        return tuple(torch.cat(parts)[back] if parts[0] is not None else None for parts in zip(*outs))

    @torch.no_grad()
    def reference_logprobs(self, batch: RolloutBatch) -> torch.Tensor:
        """The reference policy's log-probs, in the policy's precision (under --bf16 the same
        autocast as the policy's forward: at step 0 the KL is exactly 0)."""
        if self.ref_model is not None:
            with self.accelerator.autocast():
                return self._batched_forward(self.ref_model, batch)[0]
        with self.policy.disable_adapter():  # LoRA: the base model is the reference
            return self._batched_forward(self.model, batch)[0]

    def sum_over_processes(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of ``tensor`` over processes (itself with one): global batch statistics."""
        if self.accelerator.num_processes == 1:
            return tensor
        return self.accelerator.reduce(tensor.detach().clone(), reduction="sum")

    def compute_advantages(self, batch, token_rewards, values, valid=None):
        """(advantages, returns or None) from the algorithm's estimator in the registry; rows with
        ``valid`` False (every reward None) stay out of group statistics."""
        c = self.config
        estimator = ADVANTAGE_ESTIMATORS[ESTIMATOR_FOR_ALGORITHM[c.algorithm]]
        return estimator(token_rewards, batch.response_mask, group_ids=batch.group_ids, values=values,
                         gamma=c.gamma, lam=c.lam, scale=c.scale_rewards, reduce=self.sum_over_processes,
                         valid=valid)

    def _repro_needs_entropies(self, batch: RolloutBatch) -> bool:
        """Whether REPRO ranks some rollout's line breaks by entropy (``ReproReward.needs_entropies``),
        on any process: all of them then run the pass (under ZeRO-3 a forward pass is collective)."""
        if self.repro is None:
            return False
        local = torch.tensor(float(self.repro.needs_entropies(self.tokenizer, batch)), device=self.accelerator.device)
        return bool(self.sum_over_processes(local) > 0)

    def repro_process_term(self, batch: RolloutBatch) -> tuple[torch.Tensor, dict]:
        """REPRO's term, scored with the current policy: for PPO the group-normalised process
        rewards (GAE accumulates them), otherwise their normalised return-to-go Ã."""
        from algos.process_advantages import ALGO_TO_MODE, normalize_process_rewards, repro_advantage

        c = self.config
        out = self.repro(self.policy, self.tokenizer, batch, [str(a) for a in batch.extras["answer"]])
        mode = ALGO_TO_MODE[c.algorithm]
        rewards = out.token_rewards.to(batch.response_mask.device)
        reward_mask = out.reward_mask.to(rewards.device)
        if c.algorithm == "ppo":
            term = normalize_process_rewards(rewards, reward_mask, batch.group_ids, mode,
                                             reduce=self.sum_over_processes)
            term = term * reward_mask
        else:
            term = repro_advantage(rewards, reward_mask, batch.response_mask, batch.group_ids, mode,
                                   reduce=self.sum_over_processes)
        stats = {f"repro/{k}": v for k, v in out.stats.items()}
        return term, stats

    def score(self, batch: RolloutBatch):
        """The reward stack on a rollout batch (completion ids cut at each response's length)."""
        start = time.perf_counter()
        lengths = batch.response_mask.sum(dim=1)
        rewards = self.reward(batch.prompts, batch.completions,
                              [ids[: int(n)].tolist() for ids, n in zip(batch.response_ids, lengths)], batch.extras)
        self.scoring_seconds += time.perf_counter() - start
        return rewards

    def reward(self, prompt_texts, completions, completion_ids, extras):
        """The reward stack as TRL calls rewards: the dataset's prompts (``extras["prompt"]``), every
        other column as a keyword, and ``trainer_state`` (steps counted in optimizer steps, as TRL)."""
        from transformers import TrainerState

        c = self.config
        per_step = c.num_iterations * c.steps_per_generation
        state = TrainerState(global_step=self.step * per_step, max_steps=self.total_optimizer_steps,
                             epoch=self.prompts_consumed / max(len(self.train_records), 1))
        columns = {k: v for k, v in extras.items() if k != "prompt"}
        return self.rewards(extras["prompt"], completions, completion_ids, prompt_texts=prompt_texts,
                            trainer_state=state, **columns)

    def sample(self):
        """(batch, rewards, every generated sequence's reward components, stats) for one step.

        With --dynamic_sampling, groups whose rewards are all equal are dropped and fresh prompts
        sampled until this process has ``prompts_per_device`` informative groups, for at most
        --dynamic_sampling_max_rounds rounds. Rounds run in step on every process (the prompt
        position, part of the resumable state, advances the same way everywhere); a process that
        is full skips generating. Short after the last round, the step trains on what it has."""
        c = self.config
        if not c.dynamic_sampling:
            batch = self.rollout(*self.next_prompts())
            rewards = self.score(batch)
            return batch, rewards, rewards, {}
        need, have, rounds, generated, informative = c.prompts_per_device, 0, 0, 0, 0
        parts, seen, last = [], [], None
        while True:
            rounds += 1
            prompts, extras = self.next_prompts()
            if have < need:
                batch = self.rollout(prompts, extras)
                rewards = self.score(batch)
                seen.append(rewards)
                keep = informative_groups(rewards.total, batch.group_ids.cpu())
                generated += len(set(batch.group_ids.tolist()))
                informative += len(set(batch.group_ids[keep.to(batch.group_ids.device)].tolist()))
                rows = first_groups(keep, batch.group_ids.cpu(), need - have)
                if rows:
                    parts.append((batch.select(rows), _select_rewards(rewards, rows)))
                    have += len(set(batch.group_ids[rows].tolist()))
                last = (batch, rewards)
            missing = self.sum_over_processes(torch.tensor(float(need - have), device=self.accelerator.device))
            if float(missing) <= 0 or rounds >= c.dynamic_sampling_max_rounds:
                break
        if not parts:  # nothing informative: one group (zero advantage) keeps this process in step
            batch, rewards = last
            rows = first_groups(torch.ones(len(batch), dtype=torch.bool), batch.group_ids.cpu(), 1)
            parts.append((batch.select(rows), _select_rewards(rewards, rows)))
        if have < need:
            print(f"[repro-rl] step {self.step + 1}, process {self.accelerator.process_index}: dynamic "
                  f"sampling found {have} of {need} informative groups in {rounds} rounds; training on those",
                  flush=True)
        batch = concat_batches([b for b, _ in parts], self.tokenizer.pad_token_id)
        rewards = _concat_rewards([r for _, r in parts])
        stats = {"dynamic_sampling/rounds": float(rounds), "dynamic_sampling/groups": float(have),
                 "dynamic_sampling/informative_fraction": informative / max(generated, 1)}
        return batch, rewards, _concat_rewards(seen), stats

    def loss_mask(self, batch: RolloutBatch) -> torch.Tensor:
        """The tokens the loss sees: the response, less truncated completions with
        --mask_truncated_completions (TRL; DAPO's overlong filtering)."""
        mask = batch.response_mask.float()
        if self.config.mask_truncated_completions:
            finished = torch.tensor([r != "length" for r in batch.finish_reasons], device=mask.device)
            mask = mask * finished[:, None].to(mask.dtype)
        return mask

    def training_step(self) -> dict:
        c, acc = self.config, self.accelerator
        t0 = time.perf_counter()
        self.scoring_seconds = 0.0
        batch, rewards, generated_rewards, sampling_stats = self.sample()
        t_gen = time.perf_counter() - t0 - self.scoring_seconds
        mask = batch.response_mask.float()
        lengths = mask.sum(dim=1)

        t1 = time.perf_counter()
        scores = rewards.total.to(mask.device)
        last = (lengths.long() - 1).clamp(min=0)
        token_rewards = torch.zeros_like(mask)
        token_rewards[torch.arange(len(batch)), last] = scores
        t_reward = self.scoring_seconds + time.perf_counter() - t1

        t2 = time.perf_counter()
        reuse_rollout = c.num_iterations == 1 and c.steps_per_generation == 1
        # Off-policy updates and PPO's values need the forward pass before the update; so do, without the
        # engine's entropies, a KL in the reward (the trainer's own log-probs) and REPRO when entropies pick
        # its points (asked last: it tokenises the batch and synchronises the processes).
        needs_trainer_pass = not reuse_rollout or c.algorithm == "ppo" or (not self.engine_entropies and (
            (c.kl_coef > 0 and c.kl_in_reward) or self._repro_needs_entropies(batch)))
        old_logp, old_values = None, None
        self.entropy_in_update = False
        if needs_trainer_pass:
            old_logp, old_values, entropies = self._batched_forward(
                self.model, batch, with_entropy=not self.engine_entropies)
            if entropies is not None:
                batch.entropies = entropies
        elif not self.engine_entropies:  # the update's own forward pass measures them
            self.entropy_in_update = True
        ref_logp = self.reference_logprobs(batch) if c.kl_coef > 0 else None
        kl_reward_mean = None
        if ref_logp is not None and c.kl_in_reward:
            behaviour = old_logp if old_logp is not None else batch.logprobs
            kl = kl_estimate(behaviour, ref_logp, c.kl_kind) * mask
            token_rewards = token_rewards - c.kl_coef * kl
            kl_reward_mean = float(kl.sum() / mask.sum().clamp(min=1))
        repro_stats, process, t_repro = {}, None, 0.0
        if self.repro is not None:
            repro_start = time.perf_counter()
            process, repro_stats = self.repro_process_term(batch)
            t_repro = time.perf_counter() - repro_start
            if c.algorithm == "ppo":  # group-normalised process rewards join the rewards GAE sees
                token_rewards = token_rewards + c.repro_alpha * process
        scorable = rewards.scorable.to(mask.device)
        advantages, returns = self.compute_advantages(batch, token_rewards, old_values, scorable)
        if process is not None and c.algorithm != "ppo":
            advantages = advantages + c.repro_alpha * process
        advantages = advantages * scorable.unsqueeze(1)  # every reward None: no learning signal (TRL)
        t_prep = time.perf_counter() - t2 - t_repro  # REPRO's scoring counts as reward time
        t_reward += t_repro

        t3 = time.perf_counter()
        update_stats = self.update(batch, UpdateInputs(advantages, self.loss_mask(batch), old_logp, ref_logp,
                                                       old_values, returns))
        t_update = time.perf_counter() - t3

        # Metrics (averaged over processes) ------------------------------------------------------
        step_time = time.perf_counter() - t0
        all_scores = generated_rewards.total  # every sequence generated this step (all rounds)
        local = {
            "reward/mean": all_scores.mean(),
            "reward/std": all_scores.std() if len(all_scores) > 1 else all_scores.new_zeros(()),
            "completion_length/mean": lengths.mean(), "completion_length/max": lengths.max(),
            "completion_length/clipped_ratio": torch.tensor(
                sum(r == "length" for r in batch.finish_reasons) / len(batch)),
            "entropy": (batch.entropies * mask).sum() / mask.sum().clamp(min=1),
            "advantages/abs_mean": (advantages.abs() * mask).sum() / mask.sum().clamp(min=1),
            "rollout/sequences_per_prompt": torch.tensor(len(batch) / len(set(batch.group_ids.tolist()))),
            "rollout/generated_tokens": lengths.sum(),
        }
        if "weight_sync_seconds" in getattr(self.engine, "last_timing", {}):
            local["time/weight_sync_seconds"] = torch.tensor(self.engine.last_timing["weight_sync_seconds"])
        for name, values in generated_rewards.components.items():
            local[f"rewards/{name}"] = torch.nanmean(values).nan_to_num(0.0)
        if c.mask_truncated_completions:
            local["loss/masked_truncated_fraction"] = torch.tensor(
                sum(r == "length" for r in batch.finish_reasons) / max(len(batch), 1))
        local.update({k: torch.tensor(v) for k, v in sampling_stats.items()})
        if kl_reward_mean is not None:
            local["kl"] = torch.tensor(kl_reward_mean)
        local.update(update_stats)
        local.update({k: torch.tensor(float(v)) for k, v in repro_stats.items()})
        metrics = {k: float(v) for k, v in zip(
            local, acc.reduce(torch.stack([torch.as_tensor(v, dtype=torch.float32).to(acc.device)
                                           for v in local.values()]), reduction="mean"))}
        if "rewards/accuracy" in metrics:
            metrics["accuracy"] = metrics["rewards/accuracy"]
        gen_tokens = float(acc.reduce(lengths.sum().to(acc.device), reduction="sum"))
        train_tokens = float(acc.reduce(batch.attention_mask.sum().to(acc.device).float(),
                                        reduction="sum")) * c.num_iterations
        metrics.update({
            "learning_rate": self.scheduler.get_last_lr()[0],
            "time/step_seconds": step_time, "time/generation_seconds": t_gen,
            "time/reward_seconds": t_reward, "time/logprob_seconds": t_prep,
            "time/update_seconds": t_update,
            "throughput/generation_tokens_per_second": gen_tokens / max(t_gen, 1e-9),
            "throughput/training_tokens_per_second": train_tokens / max(t_update, 1e-9),
            "throughput/tokens_per_second": (gen_tokens + train_tokens / c.num_iterations) / step_time,
        })
        self._last_batch, self._last_rewards = batch, rewards
        return metrics

    def update(self, batch: RolloutBatch, inputs: "UpdateInputs") -> dict:
        """num_iterations x steps_per_generation optimizer steps over the rollout batch.

        Each mini-batch's loss is aggregated over the *global* mini-batch: the denominator of the
        loss aggregation mode (tokens, sequences or B x max_len) is summed over micro-batches and
        processes, each micro-batch's loss is its numerator over that sum, times the number of
        processes (DDP averages gradients) and of accumulation steps (``accelerator.backward``
        divides by them). The gradient is then that of one process holding the whole batch."""
        c, acc = self.config, self.accelerator
        n = len(batch)
        sums: dict[str, float] = {}
        counts = 0
        optimizer_steps = c.num_iterations * c.steps_per_generation
        self.model.train()
        for _ in range(c.num_iterations):
            order = torch.randperm(n) if c.steps_per_generation > 1 else torch.arange(n)
            for mini in torch.tensor_split(order, c.steps_per_generation):
                mini = mini.tolist()
                if c.gradient_accumulation_steps > 1:  # micro-batches of similar lengths pad less
                    mini = [mini[i] for i in rows_by_length(batch.attention_mask[mini].sum(dim=1))]
                denominator = self.sum_over_processes(aggregation_denominator(
                    inputs.loss_mask[mini], c.agg_mode, c.max_completion_length).to(acc.device))
                for rows in micro_batches(mini, c.gradient_accumulation_steps):
                    with acc.accumulate(self.model):
                        stats = {}
                        if rows:  # EAGER batches may leave a micro-batch empty; it still counts
                            stats = self._micro_step_by_length(batch, rows, inputs, denominator)
                            counts += 1
                        if acc.sync_gradients:
                            grad_norm = acc.clip_grad_norm_(self.model.parameters(),
                                                            c.max_grad_norm or float("inf"))
                            stats["grad_norm"] = float(grad_norm) if grad_norm is not None else 0.0
                        self.optimizer.step()
                        if acc.sync_gradients:
                            self.scheduler.step()
                            self._policy_changed()
                        self.optimizer.zero_grad(set_to_none=True)
                    for k, v in stats.items():
                        sums[k] = sums.get(k, 0.0) + v
        # losses are summed shares of each mini-batch's loss; the other stats are micro-batch means
        out = {k: v / (optimizer_steps if k in _LOSS_KEYS else max(counts, 1))
               for k, v in sums.items() if k != "grad_norm"}
        if "grad_norm" in sums:
            out["grad_norm"] = sums["grad_norm"] / optimizer_steps
        return out

    def _micro_step_by_length(self, batch: RolloutBatch, rows, inputs, denominator) -> dict:
        """One micro-batch as buckets of rows of similar length (``length_buckets``, then split to
        --max_tokens_per_micro_batch padded tokens), each bucket trimmed of its padding and run
        forward/backward on its own. Each bucket's loss is already
        its share of the mini-batch (global denominator), so the summed gradient is the
        micro-batch's; loss stats add up, the others are weighted by the bucket's tokens."""
        acc, budget = self.accelerator, self.config.max_tokens_per_micro_batch
        lengths = batch.attention_mask[rows].sum(dim=1).tolist()
        buckets = length_buckets(rows, lengths, self.bucket_min_fill)
        if budget and self.bucket_min_fill:  # a token budget: no padded pass above it (not under DeepSpeed)
            by_row = dict(zip(rows, lengths))
            buckets = [part for bucket in buckets
                       for part in token_budget_batches(bucket, [by_row[r] for r in bucket], budget)]
        if len(buckets) == 1:
            return self._micro_step(batch.select(rows), rows, inputs, denominator)
        tokens = max(float(batch.response_mask[rows].sum()), 1.0)
        out: dict[str, float] = {}
        for i, bucket in enumerate(buckets):
            # Gradients of all buckets are summed locally; processes synchronise once, after the last.
            with contextlib.nullcontext() if i == len(buckets) - 1 else acc.no_sync(self.model):
                stats = self._micro_step(batch.select(bucket), bucket, inputs, denominator)
            token_share = float(batch.response_mask[bucket].sum()) / tokens
            for k, v in stats.items():
                out[k] = out.get(k, 0.0) + v * (1.0 if k in _LOSS_KEYS else token_share)
        return out

    def _micro_step(self, micro: RolloutBatch, rows, inputs: "UpdateInputs", denominator) -> dict:
        c, acc = self.config, self.accelerator
        mask = micro.response_mask.float()
        loss_mask = inputs.loss_mask[rows]
        logp, values, entropy = self.forward(self.model, micro, with_entropy=self.entropy_in_update)
        old = inputs.old_logp[rows] if inputs.old_logp is not None else logp.detach()
        stats = {}
        is_weights = None
        if c.use_vllm:  # engine mismatch: pi_train (old) against the engine's own log-probs
            weights, mismatch = engine_is_weights(old, micro.logprobs, mask, c.vllm_importance_sampling_mode,
                                                  c.vllm_importance_sampling_cap)
            stats.update({f"vllm/{k}": float(v) for k, v in mismatch.items()})
            if c.vllm_importance_sampling_correction:
                is_weights = weights
                stats["vllm/is_weight_mean"] = float((weights * mask).sum() / mask.sum().clamp(min=1))
        if entropy is not None:
            stats["entropy"] = float((entropy * mask).sum() / mask.sum().clamp(min=1))
        pg_loss, pg_stats = policy_loss(
            logp, old, inputs.advantages[rows], loss_mask, epsilon_low=c.epsilon,
            epsilon_high=c.epsilon_high or None, dual_clip=c.dual_clip or None,
            agg_mode=c.agg_mode, max_len=c.max_completion_length, is_weights=is_weights,
            loss=c.policy_loss_name, denominator=denominator)
        loss = pg_loss
        # losses are logged as this process's share of the global loss, times the process count:
        # the mean over processes (the metrics' reduction) is then the global loss
        world = acc.num_processes
        stats.update({"loss/policy": pg_loss.item() * world, "clip_fraction": float(pg_stats["clipfrac"]),
                      "approx_kl": float(pg_stats["approx_kl"])})
        if inputs.ref_logp is not None and not c.kl_in_reward:
            kl = kl_estimate(logp, inputs.ref_logp[rows], c.kl_kind)
            kl_loss = aggregate(kl, loss_mask, c.agg_mode, c.max_completion_length, denominator)
            loss = loss + c.kl_coef * kl_loss
            stats["kl"] = kl_loss.item() * world
        if values is not None and inputs.returns is not None:
            vf_loss, vf_stats = value_loss(values, inputs.old_values[rows], inputs.returns[rows], loss_mask,
                                           c.cliprange_value, c.agg_mode, c.max_completion_length, denominator)
            loss = loss + c.vf_coef * vf_loss
            stats.update({"loss/value": vf_loss.item() * world, "value_clip_fraction": float(vf_stats["vf_clipfrac"])})
        acc.backward(loss * world * c.gradient_accumulation_steps)
        return stats

    # The loop ---------------------------------------------------------------------------------
    def evaluate(self) -> dict:
        start = time.perf_counter()
        with self.gathered_for_generation():
            result = evaluate_accuracy(self.policy, self.eval_engine, self.eval_records, self.prompt_text,
                                       self.accelerator, batch_size=self.config.eval_batch_size)
        return {"eval/accuracy": result["accuracy"], "eval/completion_length": result["mean_length"],
                "time/eval_seconds": time.perf_counter() - start}

    def eval_line(self, result: dict) -> str:
        return (f"{result['eval/accuracy']:.3f} on {len(self.eval_records)} problems "
                f"(greedy, mean completion {result['eval/completion_length']:.0f} tokens, "
                f"{result['time/eval_seconds']:.0f} s)")

    def weight_checksums(self) -> list[float]:
        """Sum of all weights on each process: equal values mean the replicas did not diverge."""
        with torch.no_grad():
            local = sum(p.detach().double().sum() for p in self.model.parameters())
        return self.accelerator.gather(local.reshape(1).to(self.accelerator.device)).tolist()

    def trainer_state(self) -> dict:
        return {"step": self.step, "prompts_consumed": self.prompts_consumed,
                "num_processes": self.accelerator.num_processes,
                "rank_weight_checksums": self.weight_checksums(),
                "config": dataclasses.asdict(self.config)}

    def save(self, name: str | None = None) -> Path:
        c = self.config
        return save_checkpoint(self.accelerator, self.model, self.tokenizer, c.output_dir, self.step,
                               self.trainer_state(), c.save_total_limit, name=name)

    def resume(self) -> None:
        c = self.config
        checkpoint = resolve_resume(c.output_dir, c.resume_from_checkpoint)
        if checkpoint is None:
            if c.resume_from_checkpoint:
                self.log_main(f"[repro-rl] no checkpoint in {c.output_dir}: starting from step 0")
            if self.tracker:  # a fresh run: metrics.jsonl / completions.jsonl start empty
                self.tracker.keep_until(-1)
            return
        state = load_trainer_state(checkpoint)
        load_checkpoint(self.accelerator, self.model, checkpoint, state, self.weight_checksums)
        self._policy_changed()
        self.step, self.prompts_consumed = state["step"], state["prompts_consumed"]
        if self.tracker:  # lines logged after the checkpoint by the interrupted run are dropped
            self.tracker.keep_until(self.step)
        self.log_main(f"[repro-rl] resumed from {checkpoint} at step {self.step}")

    def log_samples(self, step: int) -> None:
        batch, rewards = self._last_batch, self._last_rewards
        rows = []
        for i in range(min(self.config.num_completions_to_print, len(batch))):
            each = {f"rewards/{k}": None if torch.isnan(v[i]) else float(v[i]) for k, v in rewards.components.items()}
            rows.append({"prompt": batch.prompts[i][-200:], "completion": batch.completions[i],
                         "answer": str(batch.extras.get("answer", [""] * len(batch))[i]),
                         "reward": float(rewards.total[i]), **each})
        self.tracker.log_samples(rows, step)

    def train(self) -> dict:
        c, acc = self.config, self.accelerator
        self.resume()
        summary = {}
        if c.eval_on_start and self.step == 0:
            summary["eval_start"] = self.evaluate()
            self.log_main(f"[repro-rl] held-out accuracy before training: {self.eval_line(summary['eval_start'])}")
            if self.tracker:
                self.tracker.log(summary["eval_start"], step=0)
        bar = tqdm(total=c.max_steps, initial=self.step, desc=f"{c.algorithm}", unit="step",
                   disable=not acc.is_main_process, dynamic_ncols=True)
        metrics = {}
        while self.step < c.max_steps:
            metrics = self.training_step()
            self.step += 1
            if c.eval_steps and self.step % c.eval_steps == 0 and self.step < c.max_steps:
                metrics.update(self.evaluate())
            if self.tracker and (self.step % c.logging_steps == 0 or self.step == c.max_steps):
                self.tracker.log(metrics, step=self.step)
            if self.tracker and c.log_completions_steps and self.step % c.log_completions_steps == 0:
                self.log_samples(self.step)
            bar.update(1)
            bar.set_postfix({"reward": f"{metrics['reward/mean']:.3f}",
                             "len": f"{metrics['completion_length/mean']:.0f}",
                             "s/step": f"{metrics['time/step_seconds']:.1f}"})
            if c.save_steps and self.step % c.save_steps == 0 and self.step < c.max_steps:
                self.save()
        bar.close()
        final = self.save(name="final")
        summary["last_metrics"] = metrics
        if self.eval_records and c.num_eval_samples:
            summary["eval_end"] = self.evaluate()
            self.log_main(f"[repro-rl] held-out accuracy after training: {self.eval_line(summary['eval_end'])}")
            if self.tracker:
                self.tracker.log(summary["eval_end"], step=self.step)
        if self.tracker:
            self.tracker.close()
        self.log_main(f"[repro-rl] done: final model in {final}; metrics in "
                      f"{Path(c.output_dir) / 'metrics.jsonl'}")
        return summary
