"""What the trainer tells Accelerate and DeepSpeed when it runs under a DeepSpeed launch config.

Two things a ``configs/accelerate/zero*.yaml`` launch needs from the trainer (found running them):

1. ``Accelerator(cpu=True)`` silently replaces DeepSpeed by plain data parallelism (accelerate's
   ``PartialState`` skips DeepSpeed when ``cpu`` is set). With ``cpu=False`` and no CUDA, accelerate
   finds no process-group backend and counts one process, while DeepSpeed (``DS_ACCELERATOR=cpu``)
   runs its group of N. So without CUDA, under a DeepSpeed launch, the trainer passes
   ``cpu=False`` and the gloo backend (:func:`accelerator_placement`).
2. DeepSpeed needs ``train_micro_batch_size_per_gpu``; Accelerate reads it from a dataloader,
   and the trainer has none, so it is set from ``per_device_train_batch_size`` before ``prepare``.
3. Under ZeRO-3, transformers loads every model with its parameters already partitioned
   (``deepspeed.zero.Init``), so a frozen model outside the training engine (the KL reference)
   needs an engine of its own to gather them in its forward pass (:func:`prepare_frozen_model`,
   as TRL's ``prepare_deepspeed`` does).
4. Generation with our own decoders runs the policy once per token. Under ZeRO-3 each of those
   forward passes would gather every layer's parameters again; :func:`gathered_for_generation`
   gathers them once for the whole generation.
5. A live engine keeps its process group, and a gloo group alive at the interpreter's exit can abort the
   process. The engines stay reachable after training through their hooks (and, under ZeRO-3, through a
   module-level stack DeepSpeed never empties), so the entry points release them (:func:`release_engines`).
"""
from __future__ import annotations

import contextlib
import copy
import os
import sys

import torch

__all__ = ["accelerator_placement", "deepspeed_launch", "fill_deepspeed_config", "gathered_for_generation",
           "prepare_frozen_model", "release_engines", "zero_stage"]


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


def zero_stage(accelerator) -> int:
    """The DeepSpeed ZeRO stage of the launch, 0 without DeepSpeed."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return 0 if plugin is None else int(plugin.zero_stage)


@contextlib.contextmanager
def gathered_for_generation(model, accelerator, enabled: bool = True):
    """Under ZeRO-3 (and ``enabled``): every parameter of the engine ``model`` gathered once, and
    DeepSpeed's per-module hooks off, until the block ends (DeepSpeed's own
    ``deepspeed.runtime.zero.stage3.unwrap_model_for_generation``; TRL's ``ds3_gather_for_generation``).
    Each process then holds the whole model for the generation. Otherwise it does nothing."""
    if not enabled or zero_stage(accelerator) != 3:
        yield
        return
    from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation

    with unwrap_model_for_generation(model):
        yield


def prepare_frozen_model(model, accelerator):
    """An eval-mode, gradient-free model placed for inference: under ZeRO-3, wrapped in a DeepSpeed
    engine with the launch's ZeRO-3 config and no optimizer (its forward gathers the partitioned
    parameters; module doc, item 3); otherwise moved to the accelerator's device."""
    model = model.eval().requires_grad_(False)
    if zero_stage(accelerator) != 3:
        return model.to(accelerator.device)
    import deepspeed

    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    config.pop("optimizer", None)
    config.pop("scheduler", None)
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()  # DeepSpeedEngine.eval returns None
    return engine


def release_engines(accelerator) -> None:
    """Free the run's engines while the interpreter is alive (module doc, item 5), once nothing runs a
    forward pass any more. Accelerate's ``free_memory()`` destroys what it prepared. Two module-level
    holders in DeepSpeed 0.19 keep ZeRO-3 models, whose hooks hold their engines: the stack of modules in
    forward (``FWD_MODULE_STACK`` in deepspeed/runtime/zero/parameter_offload.py, whose bottom entry is never
    popped) and the class-wide ``functools.lru_cache`` on the parameter coordinator's
    ``__params_to_release`` (deepspeed/runtime/zero/partitioned_param_coordinator.py), keyed by coordinator
    and module. Both are emptied; either missing (another DeepSpeed) is skipped."""
    accelerator.free_memory()
    offload = sys.modules.get("deepspeed.runtime.zero.parameter_offload")
    if offload is not None and isinstance(getattr(offload, "FWD_MODULE_STACK", None), list):
        offload.FWD_MODULE_STACK.clear()
    coordinator = sys.modules.get("deepspeed.runtime.zero.partitioned_param_coordinator")
    if coordinator is not None:
        method = vars(coordinator.PartitionedParameterCoordinator).get(
            "_PartitionedParameterCoordinator__params_to_release")
        for cell in getattr(method, "__closure__", None) or ():  # under DeepSpeed's instrument_w_nvtx wrapper
            if hasattr(cell.cell_contents, "cache_clear"):
                cell.cell_contents.cache_clear()
