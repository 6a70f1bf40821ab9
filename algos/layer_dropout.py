"""Layer dropout while fine-tuning: each decoder block is skipped for a whole training step with probability p_l.

    H_l = H_{l-1}          with probability p_l   (the block is not run: no compute, no gradient)
    H_l = f_l(H_{l-1})     otherwise

A model fine-tuned so learns to do without those blocks, which a layer router (Dr.LLM, ``routers/``) or an early
exit asks of it at inference (on the thinking recipe's 32-64 steps it made skips survivable but cost the dense
path accuracy: README, "The thinking default model"). Sources: LayerDrop (Fan et al., arXiv 1909.11556, structured
dropout of whole layers, one draw per batch) and LayerSkip (Elhoushi et al., arXiv 2404.16710, Sec. 4.1: rates
rising with depth). Schedules for L blocks and a rate ``p``:

* ``uniform``:     p_l = p
* ``exponential``: p_l = p * (2^(l / (L - 1)) - 1)   (LayerSkip's depth scaling: 0 at the first block, p at the last)

``blocks`` ("3-7,25") keeps the rate on those blocks only (0 elsewhere): the blocks a router should learn to skip.
Some blocks cannot be dropped at all (SmolLM2-135M's teacher-forced loss rises ~20x without block 0), and with
the rate on every block the dense path is rarely trained (0.9^28 = 5% of the steps at p = 0.1 on 28 blocks).

Unlike dropout, nothing is rescaled: a skipped block's residual contribution is simply absent, as it is when a
router skips it. Draws come from their own seeded generator, so a fine-tune stays reproducible.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from algos.config import ConfigError

SCHEDULES = ("uniform", "exponential")


def parse_blocks(text: str, num_layers: int | None = None, what: str = "layer dropout blocks") -> list[int]:
    """Block indices from "3-7,25" (ranges inclusive); empty text gives []. With ``num_layers``, each must be < it.
    ``what`` names the setting in the error."""
    blocks: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        first, dash, last = part.partition("-")
        try:
            low, high = int(first), int(last if dash else first)
        except ValueError:
            raise ConfigError(f"{what} must look like '3-7,25', got {text!r}") from None
        if low < 0 or high < low:
            raise ConfigError(f"{what} must look like '3-7,25' (ascending, from 0), got {text!r}")
        blocks.update(range(low, high + 1))
    if num_layers is not None and blocks and max(blocks) >= num_layers:
        raise ConfigError(f"{what}: block {max(blocks)} does not exist: the model has {num_layers} blocks "
                          f"(0-{num_layers - 1})")
    return sorted(blocks)


def layer_dropout_rates(rate: float, num_layers: int, schedule: str = "uniform", blocks: str = "") -> list[float]:
    """p_l for blocks 0 … L-1 (formulas in the module docstring); ``blocks`` keeps them on those blocks only."""
    if not 0.0 <= rate < 1.0:
        raise ConfigError(f"layer dropout rate must be in [0, 1), got {rate}")
    if schedule not in SCHEDULES:
        raise ConfigError(f"layer dropout schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if schedule == "uniform" or num_layers == 1:
        rates = [rate] * num_layers
    else:
        rates = [rate * (2.0 ** (l / (num_layers - 1)) - 1.0) for l in range(num_layers)]
    chosen = parse_blocks(blocks, num_layers)
    return [p if not chosen or l in chosen else 0.0 for l, p in enumerate(rates)]


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder blocks of a ``*ForCausalLM`` (``.model.layers``; a PEFT wrapper is looked through)."""
    body = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    layers = getattr(body, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ConfigError(f"layer dropout needs a decoder with .layers; {type(model).__name__} has none")
    return layers


@contextlib.contextmanager
def blocks_skipped_where(model, skip: Callable[[int, torch.nn.Module], bool]) -> Iterator[None]:
    """Within the block, decoder block ``l`` of ``model`` returns its input unchanged (no compute, no gradient)
    whenever ``skip(l, block)`` is true at its call. The blocks' own ``forward`` is restored on exit, so the saved
    model is the usual one. Layer dropout and skip distillation (:mod:`algos.skip_distillation`) both use it."""
    layers = decoder_layers(model)
    for index, layer in enumerate(layers):
        run = layer.forward

        def forward(hidden_states, *args, _run=run, _index=index, _layer=layer, **kwargs):
            return hidden_states if skip(_index, _layer) else _run(hidden_states, *args, **kwargs)

        layer.forward = forward
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward  # the instance attribute; the class's forward shows again


@contextlib.contextmanager
def layer_dropout(model, rate: float, schedule: str = "uniform", blocks: str = "",
                  seed: int = 0) -> Iterator[list[float]]:
    """Within the block, every decoder block of ``model`` in training mode returns its input unchanged with
    probability p_l (one draw per call, i.e. per forward pass of a batch); in eval mode it always runs.
    Yields the rates. The blocks' own ``forward`` is restored on exit, so the saved model is the usual one. Every
    process of a distributed run draws the same blocks (same seed), and DDP must allow unused parameters."""
    if rate > 0 and getattr(model, "is_gradient_checkpointing", False):
        raise ConfigError("layer dropout cannot run with gradient checkpointing (the recomputed forward would draw "
                          "other blocks); turn one of them off")
    rates = layer_dropout_rates(rate, len(decoder_layers(model)), schedule, blocks)
    if not any(p > 0 for p in rates):
        yield rates
        return
    generator = torch.Generator().manual_seed(seed)

    def dropped(index: int, layer: torch.nn.Module) -> bool:
        return rates[index] > 0 and layer.training and torch.rand((), generator=generator).item() < rates[index]

    with blocks_skipped_where(model, dropped):
        yield rates


__all__ = ["SCHEDULES", "blocks_skipped_where", "decoder_layers", "layer_dropout", "layer_dropout_rates",
           "parse_blocks"]
