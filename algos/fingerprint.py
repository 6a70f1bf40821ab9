"""One weight fingerprint for everything made for a base model: the LYNX probe export and its event
collection, the Dr.LLM router export and its traces, the deploy bundle.

    weight_fingerprint(model)   # 16 hex digits; the same for fp32 and bf16 copies of one model

Every tensor of ``model.state_dict()`` (parameters and persistent buffers; a tied weight counts
under each of its names) is rounded to bfloat16 and read as int16 codes x (integer and bool
tensors: their values). In blocks of 2^20 codes the exact integer checksum

    s = sum_j x_j * w_j,   w_j = (((j + 1) * 2654435761 mod 2^32) >> 12) + 1  in [1, 2^20]

(Knuth's multiplicative hash as fixed pseudo-random weights) is taken in int64 on the tensor's own
device: |x_j w_j| <= 2^35, so a block's sum stays below 2^55 and is exact, the same on CPU and GPU.
The fingerprint is the first 16 hex digits of sha256 over (name, shape, block sums), names sorted.

What it sees and what it does not:
* Rounding to bf16 is exact and unique, so a bf16 copy of an fp32 model (``.to(torch.bfloat16)``,
  or loaded with ``dtype=torch.bfloat16``) has the fp32 model's fingerprint.
* A weight change is seen when it moves a weight across a bf16 rounding boundary. One Adam step
  at lr 1e-6 moves every trained weight by about 1e-6; a weight of size 0.02 (bf16 spacing 1.2e-4)
  crosses with probability about 1%, so a model with millions of weights changes fingerprint; a
  merged LoRA likewise. A change that crosses no boundary (a few weights moved by much less than
  their bf16 spacing) is not seen.
* A float16 copy is rounded twice (fp32 -> fp16 -> bf16), which differs from rounding once for
  some weights: fp16 copies do not match, and the loaders say "load the model in float32 or bfloat16".
* Names count: a PEFT-wrapped model or one with unmerged LoRA layers differs from its merged copy.
"""
from __future__ import annotations

import hashlib
import warnings

import torch

from algos.models import model_identity

BLOCK = 1 << 20
FINGERPRINT_KEY = "weights_fingerprint"  # the key exports record it under, inside their base-model identity
_mix_weights: dict[torch.device, torch.Tensor] = {}


def _mix(device: torch.device) -> torch.Tensor:
    """w_j for j < BLOCK on ``device`` (made once per device)."""
    if device not in _mix_weights:
        j = torch.arange(1, BLOCK + 1, dtype=torch.int64, device=device)
        _mix_weights[device] = (j * 2654435761) % (1 << 32) // 4096 + 1
    return _mix_weights[device]


def tensor_checksums(tensor: torch.Tensor) -> list[int]:
    """The block sums s of one tensor (see the module docstring)."""
    flat = tensor.detach().reshape(-1)
    w = _mix(flat.device)
    sums = []
    for start in range(0, flat.numel(), BLOCK):
        part = flat[start:start + BLOCK]
        codes = part.to(torch.bfloat16).view(torch.int16) if part.is_floating_point() else part
        sums.append((codes.to(torch.int64) * w[:part.numel()]).sum())
    return torch.stack(sums).tolist() if sums else []


@torch.no_grad()
def weight_fingerprint(model) -> str:
    """16 hex digits of sha256 over the names, shapes and bf16 checksums of ``model.state_dict()``."""
    digest, done = hashlib.sha256(), {}
    for name, tensor in sorted(model.state_dict(keep_vars=True).items()):
        if id(tensor) not in done:  # tied weights are summed once
            done[id(tensor)] = tensor_checksums(tensor)
        digest.update(f"{name}|{tuple(tensor.shape)}|{done[id(tensor)]}\n".encode())
    return digest.hexdigest()[:16]


def base_identity(model) -> dict:
    """What an export records of its base model: :func:`algos.models.model_identity` + the fingerprint."""
    return {**model_identity(model), FINGERPRINT_KEY: weight_fingerprint(model)}


def weights_mismatch(saved: dict, model, where: str) -> str | None:
    """None when ``model`` has the weights ``saved`` (a :func:`base_identity`) was made from, else one
    line saying so. An identity without a fingerprint (an export older than it) passes with a warning."""
    expected = saved.get(FINGERPRINT_KEY)
    if expected is None:  # stacklevel: the caller of load_probe / load_router
        warnings.warn(f"{where} records no weights fingerprint (an older export): the base model's weights are not "
                      "checked; export it again to have them checked", stacklevel=4)
        return None
    current = weight_fingerprint(model)
    if current == expected:
        return None
    half = any(p.dtype == torch.float16 for p in model.parameters())
    hint = "; float16 copies never match: load the model in float32 or bfloat16" if half else ""
    name = getattr(model.config, "_name_or_path", None) or "unnamed"
    return (f"{where} was trained for {saved.get('name') or 'another model'} (weights fingerprint {expected}), but the "
            f"model given ({name}) has weights fingerprint {current}{hint}; load it with the model it was trained on")


__all__ = ["BLOCK", "FINGERPRINT_KEY", "base_identity", "tensor_checksums", "weight_fingerprint", "weights_mismatch"]
