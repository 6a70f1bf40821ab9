"""Supervised fine-tuning (TRL ``SFTTrainer``), and the thinking default model built with it.

``run_sft`` fine-tunes a causal LM on prompt-completion pairs: the seeded thinking traces of
:mod:`algos.thinking_task` (``dataset="thinking"``), or any dataset in TRL's prompt-completion or
conversational layout. Prompts are rendered exactly as the RL trainer renders them
(:func:`algos.data.build_prompt`), so the model is fine-tuned on the inputs it will see; the loss
covers completion tokens only (TRL's ``completion_only_loss``) and EOS closes every completion.

The markers ``<think>`` and ``</think>`` are written as text (several tokens each for SmolLM2),
which a short SFT learns at once. With ``add_think_tokens`` the tokenizer gains them as single,
non-special tokens (as Qwen3 and DeepSeek-R1 have them) and the embedding two mean-initialised rows
(transformers' ``mean_resizing``); those rows need far more than the recipe's 32 steps to be
emitted, so the recipe leaves it off. On the thinking task the chat template also learns to drop
earlier turns' thinking (:func:`thinking_chat_template`).

``layer_dropout`` skips decoder blocks at random while training (:mod:`algos.layer_dropout`);
``skip_distillation_sets`` trains the dense path on the data and paths with those blocks skipped on the dense
path's predictions (:mod:`algos.skip_distillation`). Both are off in the recipe.

The thinking default, ``smollm2-135m-thinking``, is the embedded default fine-tuned with
:data:`THINKING_RECIPE`; :func:`thinking_model_path` builds it once (a few minutes on a laptop CPU,
with a progress bar) and caches it next to the converted default.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from algos.thinking_task import THINK_END, THINK_START, ThinkingTask, TraceStyle

from algos.models import THINKING_MODEL  # the name jobs accept
RECIPE_VERSION = "v2"  # bump when THINKING_RECIPE or the trace generator changes: the cache rebuilds


@dataclass
class SFTJobConfig:
    """One SFT run; train/sft.py exposes every field as a flag."""

    model_name_or_path: str | None = None   # None: the embedded default
    output_dir: str = "runs/sft"
    dataset: str = "thinking"                # 'thinking' or a TRL-layout file / hub dataset
    num_train_samples: int = 256
    num_train_epochs: float = 1.0
    learning_rate: float = 1.5e-4
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    warmup_ratio: float = 0.05              # a fraction of the steps (transformers warmup_steps < 1)
    max_length: int = 512
    seed: int = 0
    add_think_tokens: bool = False           # True: <think>/</think> as new single tokens (needs longer training)
    layer_dropout: float = 0.0               # > 0: skip each block with this rate while training (algos/layer_dropout.py)
    layer_dropout_schedule: str = "uniform"  # 'uniform' or 'exponential' (LayerSkip's rates rising with depth)
    layer_dropout_blocks: str = ""           # '3-7,25': the rate on those blocks only; '': on every block
    skip_distillation_sets: str = ""         # '3,4;3,4,6': distil the dense path into these skipped paths ('': off)
    skip_distillation_weight: float = 1.0    # λ of the distillation term (algos/skip_distillation.py)
    bf16: bool | None = None                 # None: bf16 autocast where it is fast (algos.device.bf16_is_fast)
    task: ThinkingTask = field(default_factory=ThinkingTask)
    report_to: str = "none"
    progress: bool = True


THINKING_RECIPE = SFTJobConfig()


def thinking_records(config: SFTJobConfig) -> list[dict]:
    """Prompt-completion rows of the thinking task's train split."""
    return config.task.generate(config.num_train_samples, seed=config.seed, split="train")


def _prompt_completion_dataset(config: SFTJobConfig, tokenizer):
    import datasets

    from algos.data import build_prompt

    if config.dataset != "thinking":
        from algos.data import DataConfigError
        path = Path(config.dataset)
        try:
            if path.suffix in (".jsonl", ".json", ".parquet"):
                kind = "parquet" if path.suffix == ".parquet" else "json"
                ds = datasets.load_dataset(kind, data_files=str(path), split="train")
            else:
                ds = datasets.load_dataset(config.dataset, split="train")
        except Exception as exc:  # datasets raises many types; keep one line for the user
            raise DataConfigError(f"cannot load SFT dataset '{config.dataset}': {str(exc).splitlines()[0]}") from exc
        if not ({"prompt", "completion"} <= set(ds.column_names) or "messages" in ds.column_names
                or "text" in ds.column_names):
            raise DataConfigError(f"SFT dataset '{config.dataset}' needs 'prompt' and 'completion', 'messages' or "
                                  f"'text' columns (TRL's layouts); it has {', '.join(ds.column_names)}")
        return ds.select(range(min(config.num_train_samples, len(ds)))) if config.num_train_samples else ds
    rows = [{"prompt": build_prompt(tokenizer, r["question"]), "completion": r["completion"]}
            for r in thinking_records(config)]
    return datasets.Dataset.from_list(rows)


_HISTORY_CONTENT = ("(message['content'].split('</think>')[-1].lstrip() "
                    "if message['role'] == 'assistant' and not loop.last else message['content'])")


def thinking_chat_template(template: str | None) -> str | None:
    """The chat template of a thinking model: earlier assistant turns lose their thinking (the text up
    to ``</think>``), as DeepSeek-R1's and Qwen3's templates do; a single-turn prompt renders as before.
    It also marks the model as thinking for :func:`probes.cues.has_thinking_block`. A template
    without ``message['content']`` is returned unchanged."""
    if not template or THINK_END in template or "message['content']" not in template:
        return template
    return template.replace("message['content']", _HISTORY_CONTENT)


def add_think_tokens(model, tokenizer) -> int:
    """Give ``tokenizer`` single ``<think>``/``</think>`` tokens (non-special) and ``model`` their
    embedding rows (mean-initialised). Returns how many tokens were added."""
    from transformers import AddedToken

    added = tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in (THINK_START, THINK_END)])
    if added:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    return added


def run_sft(config: SFTJobConfig) -> Path:
    """Fine-tune and save the model and tokenizer to ``config.output_dir`` (atomically: a temporary
    directory renamed at the end). Returns the output path."""
    import torch
    from trl import SFTConfig, SFTTrainer

    from algos.layer_dropout import decoder_layers, layer_dropout, layer_dropout_rates
    from algos.models import load_causal_lm, load_tokenizer
    from algos.sft_trainer import LabelWindowSFTTrainer, SkipDistillationSFTTrainer
    from algos.skip_distillation import SkipSetSampler, skippable_blocks

    torch.manual_seed(config.seed)
    tokenizer = load_tokenizer(config.model_name_or_path, padding_side="right")
    if config.dataset == "thinking":
        tokenizer.chat_template = thinking_chat_template(tokenizer.chat_template)
    dataset = _prompt_completion_dataset(config, tokenizer)  # bad data fails before the model loads
    model = load_causal_lm(config.model_name_or_path, dtype=torch.float32)
    if config.add_think_tokens:
        add_think_tokens(model, tokenizer)
    # Bad values fail here, before anything is written.
    layer_dropout_rates(config.layer_dropout, len(decoder_layers(model)), config.layer_dropout_schedule,
                        config.layer_dropout_blocks)
    skip_sets = _skip_distillation_sets(config, len(decoder_layers(model)))
    bf16 = config.bf16 if config.bf16 is not None else _bf16_supported()
    if config.bf16 is None and not bf16 and not torch.cuda.is_available():  # chosen here, not by the user
        print("[repro-rl] SFT in float32: this CPU has no fast bfloat16 (AVX-512); the thinking default's "
              "reference build used bf16, so its bytes differ from this one's", flush=True)
    target = Path(config.output_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent))
    try:
        args = SFTConfig(
            output_dir=str(work / "trainer"), num_train_epochs=config.num_train_epochs,
            learning_rate=config.learning_rate, per_device_train_batch_size=config.per_device_train_batch_size,
            gradient_accumulation_steps=config.gradient_accumulation_steps, warmup_steps=config.warmup_ratio,
            lr_scheduler_type="cosine", max_length=config.max_length, seed=config.seed, bf16=bf16,
            use_cpu=not torch.cuda.is_available(), completion_only_loss=True, packing=False,
            gradient_checkpointing=False,  # TRL's default is on; a 135M model fits, and it costs a third more compute
            train_sampling_strategy="group_by_length",  # batches of similar lengths: less padding
            save_strategy="no", logging_steps=5, report_to=config.report_to, disable_tqdm=not config.progress,
            dataloader_num_workers=0,
            # A dropped block has no gradient; skip distillation's dense pass reaches every parameter.
            ddp_find_unused_parameters=True if config.layer_dropout > 0 else False if skip_sets else None)
        # In fp32 on a CPU, TRL's fused LM head scores every position with per-tile torch ops and cost 44% of
        # a build step (algos/sft_trainer.py). bf16 builds keep TRL's head: the thinking default's reference
        # build, which the figures measured on AVX512-BF16 EPYCs used, came from it (its bytes stay reproducible on one
        # kind of CPU; other matmul kernels, e.g. AMX's, give other bytes).
        on_cpu_fp32 = not torch.cuda.is_available() and not bf16
        trainer_class = LabelWindowSFTTrainer if on_cpu_fp32 else SFTTrainer
        skipping = skippable_blocks(model) if skip_sets else contextlib.nullcontext(set())
        with layer_dropout(model, config.layer_dropout, config.layer_dropout_schedule, config.layer_dropout_blocks,
                           seed=config.seed), skipping as skipped:
            if skip_sets:  # its loss needs the full logits of both passes: the label window's (fp32 and bf16 alike)
                trainer = SkipDistillationSFTTrainer(
                    model=model, args=args, train_dataset=dataset, processing_class=tokenizer, skipped=skipped,
                    sampler=SkipSetSampler(skip_sets, config.seed), weight=config.skip_distillation_weight)
            else:
                trainer = trainer_class(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
            trainer.train()
        model = trainer.model
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        tokenizer.padding_side = "left"
        final = work / "final"
        model.save_pretrained(final, safe_serialization=True)
        tokenizer.save_pretrained(final)
        (final / "sft_recipe.json").write_text(_recipe_json(replace(config, bf16=bf16)))  # the precision used
        if target.exists():
            shutil.rmtree(target)
        os.replace(final, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _skip_distillation_sets(config: SFTJobConfig, num_layers: int) -> list[tuple[int, ...]]:
    """The skip sets to distil into ([] when off), checked against the model and the other options."""
    from algos.config import ConfigError
    from algos.skip_distillation import parse_skip_sets

    if not config.skip_distillation_sets.strip():
        return []
    if config.layer_dropout > 0:
        raise ConfigError("choose one of layer dropout and skip distillation (set --layer_dropout 0 or "
                          "--skip_distillation_sets '')")
    if not config.skip_distillation_weight > 0:
        raise ConfigError(f"skip distillation weight must be > 0, got {config.skip_distillation_weight}")
    return parse_skip_sets(config.skip_distillation_sets, num_layers)


def _bf16_supported() -> bool:
    """bf16 autocast where it is fast (:func:`algos.device.bf16_is_fast`): on an AVX2-only CPU the build
    runs in float32, since emulated bf16 would take hours instead of minutes."""
    from algos.device import bf16_is_fast

    return bf16_is_fast()


def _recipe_json(config: SFTJobConfig) -> str:
    import json

    data = asdict(config)
    data["task"]["style"] = asdict(config.task.style)
    return json.dumps(data, indent=2, default=str)


def thinking_model_path() -> Path:
    """The thinking default, built with :data:`THINKING_RECIPE` on first use and cached."""
    from algos.models import cache_dir

    return build_cached(cache_dir() / f"{THINKING_MODEL}-{RECIPE_VERSION}")


# What `accelerate launch` / torchrun hand a training process; the build must not inherit it.
_LAUNCH_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                     "MASTER_ADDR", "MASTER_PORT")


def build_cached(target: Path, overrides: dict | None = None) -> Path:
    """``target`` built with :data:`THINKING_RECIPE` (scalar fields replaced by ``overrides``), once.

    The build runs under a file lock, so the processes of one launch and concurrent jobs build it once
    (the others wait, then load it), and in a child process: a job that needs the model may already hold
    an Accelerate state (mixed precision, DeepSpeed, a process group) that TRL's trainer must not share.
    The child uses every core, or ``REPRO_RL_NUM_THREADS``."""
    from filelock import FileLock

    from algos.models import ModelLoadError

    target, overrides = Path(target), overrides or {}
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").exists():  # another process built it while this one waited
            return target
        traces = overrides.get("num_train_samples", THINKING_RECIPE.num_train_samples)
        print(f"[repro-rl] building the thinking default model {THINKING_MODEL} (one time: SFT of the embedded "
              f"default on {traces} seeded thinking traces, a few minutes on CPU) -> {target}", flush=True)
        env = {k: v for k, v in os.environ.items()
               if k not in _LAUNCH_VARIABLES and not k.startswith(("ACCELERATE_", "TORCHELASTIC_"))}
        env["OMP_NUM_THREADS"] = os.environ.get("REPRO_RL_NUM_THREADS") or str(os.cpu_count() or 1)
        gpu = _one_gpu()
        if gpu is not None:  # one process on one GPU: TRL's trainer refuses DataParallel over several
            env["CUDA_VISIBLE_DEVICES"] = gpu
        root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join([root, env["PYTHONPATH"]]) if env.get("PYTHONPATH") else root
        code = ("import json, sys; from algos.sft import build_recipe; from train.cli import main_guard; "
                "main_guard(lambda: build_recipe(sys.argv[1], json.loads(sys.argv[2])))")
        done = subprocess.run([sys.executable, "-c", code, str(target), json.dumps(overrides)], env=env)
        if done.returncode != 0 or not (target / "config.json").exists():
            raise ModelLoadError(f"building {THINKING_MODEL} failed (exit code {done.returncode}; its output is "
                                 f"above); run `python train/sft.py --output_dir {target}` to see it on its own")
    return target


def _one_gpu() -> str | None:
    """The GPU the build should see when several are visible (the first visible one), else None."""
    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return visible.split(",")[0].strip() if visible else "0"


def build_recipe(output_dir: str, overrides: dict) -> Path:
    """:data:`THINKING_RECIPE` with scalar ``overrides``, run into ``output_dir`` (the child's job)."""
    return run_sft(SFTJobConfig(**{**THINKING_RECIPE.__dict__, **overrides, "output_dir": output_dir}))


__all__ = ["SFTJobConfig", "THINKING_MODEL", "THINKING_RECIPE", "TraceStyle", "add_think_tokens", "build_cached",
           "build_recipe", "run_sft", "thinking_model_path", "thinking_records"]
