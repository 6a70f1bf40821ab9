"""What the trainer tells Accelerate and DeepSpeed when it runs under a DeepSpeed launch config.

Two things a ``configs/accelerate/zero*.yaml`` launch needs from the trainer (found running them):

1. ``Accelerator(cpu=True)`` silently replaces DeepSpeed by plain data parallelism (accelerate's
   ``PartialState`` skips DeepSpeed when ``cpu`` is set). With ``cpu=False`` and no CUDA, accelerate
   finds no process-group backend and counts one process, while DeepSpeed (``DS_ACCELERATOR=cpu``)
   runs its group of N. So without CUDA, under a DeepSpeed launch, the trainer passes
   ``cpu=False`` and the gloo backend (:func:`accelerator_placement`).
2. DeepSpeed needs ``train_micro_batch_size_per_gpu``; Accelerate reads it from a dataloader,
   and the trainer has none, so it is set from ``per_device_train_batch_size`` before ``prepare``.
"""
from __future__ import annotations

import os

import torch

__all__ = ["accelerator_placement", "deepspeed_launch", "fill_deepspeed_config"]


def deepspeed_launch() -> bool:
    """True inside ``accelerate launch --config_file configs/accelerate/zero2.yaml`` (or zero3)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def accelerator_placement() -> dict:
    """Keyword arguments for ``Accelerator``: ``cpu=True`` without CUDA (data parallel over gloo),
    except under a DeepSpeed launch, which gets ``cpu=False`` and the gloo backend (module doc)."""
    if torch.cuda.is_available():
        return {"cpu": False}
    if not deepspeed_launch():
        return {"cpu": True}
    from accelerate.utils import InitProcessGroupKwargs

    return {"cpu": False, "kwargs_handlers": [InitProcessGroupKwargs(backend="gloo")]}


def fill_deepspeed_config(accelerator, per_device_train_batch_size: int, gradient_accumulation_steps: int) -> None:
    """Set the batch sizes DeepSpeed checks (no-op without DeepSpeed); call before ``prepare``:
    train_batch_size = micro-batch x accumulation steps x processes."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    config = plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = int(per_device_train_batch_size)
    config["gradient_accumulation_steps"] = int(gradient_accumulation_steps)
    config["train_batch_size"] = (int(per_device_train_batch_size) * int(gradient_accumulation_steps)
                                  * accelerator.num_processes)
