"""Where a job runs and in which precision: the ``--device`` / ``--dtype`` flags of every job.

``auto`` picks CUDA with bfloat16 where CUDA is available, else the CPU with float32. A device
that is not there, or a dtype name that does not exist, is one :class:`DeviceError` line.
:func:`bf16_is_fast` decides the trainers' default mixed precision: bf16 only where the hardware runs it
fast (an AVX2-only CPU emulates bf16 matmuls, about 27x slower than float32).
"""
from __future__ import annotations

import argparse

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}

__all__ = ["DTYPES", "DeviceError", "add_device_arguments", "bf16_is_fast", "cpu_has_fast_bf16", "dtype_name",
           "module_device", "resolve_device", "resolve_device_dtype", "resolve_dtype"]


class DeviceError(ValueError):
    """A device or dtype that cannot be used here; the message names what to fix."""


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """'auto' (or None): cuda when available, else cpu; 'cuda', 'cuda:1', 'cpu' as given."""
    if name is None or str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise DeviceError(f"--device '{name}' is not a device name: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {name}: CUDA is not available here; use --device cpu (or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


def cpu_has_fast_bf16() -> bool:
    """Whether oneDNN has bfloat16 kernels for this CPU (AVX-512 BW/VL/DQ, native with AVX512-BF16 or AMX).

    Without them (an AVX2-only CPU) torch emulates bf16 matmuls: a 512x576x1536 matmul's forward and
    backward under bf16 autocast took 0.87 s against 0.033 s in float32 on one core of an AVX2 AMD EPYC
    (2026-12-05), while on an AVX512-BF16 EPYC bf16 was 2.2-3.4x faster than float32 (docs/performance.md)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN: assume emulation
        return False


def bf16_is_fast(device: torch.device | str | None = None) -> bool:
    """bfloat16 mixed precision is worth running: a CUDA GPU with bf16 (Ampere or newer), or a CPU with
    :func:`cpu_has_fast_bf16`. ``device`` None: CUDA where available, else the CPU."""
    cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    return torch.cuda.is_bf16_supported() if cuda else cpu_has_fast_bf16()


def resolve_dtype(name: str | torch.dtype | None = "auto", device: torch.device | str = "cpu") -> torch.dtype:
    """'auto' (or None): bfloat16 on a CUDA device that supports it, else float32; names as in ``DTYPES``."""
    if isinstance(name, torch.dtype):
        return name
    if name is None or name == "auto":
        cuda = torch.device(device).type == "cuda"
        return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    if name not in DTYPES:
        raise DeviceError(f"--dtype '{name}' is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_device_dtype(device: str | torch.device | None = "auto",
                         dtype: str | torch.dtype | None = "auto") -> tuple[torch.device, torch.dtype]:
    """(device, dtype) with both 'auto' rules applied."""
    resolved = resolve_device(device)
    return resolved, resolve_dtype(dtype, resolved)


def dtype_name(dtype: torch.dtype) -> str:
    """'bfloat16' for torch.bfloat16 (what results files record)."""
    return str(dtype).removeprefix("torch.")


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter (or buffer); cpu for a module with neither."""
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--device`` and ``--dtype`` (both default 'auto') to a job's parser."""
    parser.add_argument("--device", default="auto",
                        help="where the model runs: auto (cuda when available, else cpu), cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="auto", choices=("auto", *DTYPES),
                        help="model weights and activations: auto (bfloat16 on CUDA, float32 on CPU)")
