"""Rollout engines: each turns prompts into a :class:`algos.batch.RolloutBatch`.

- ``hf``: our KV-cached sampling loop (``sampler``) or transformers' ``generate``;
- ``eager``, ``eager_budget``, ``eager_engine``: EAGER entropy-aware branching and its budget;
- ``vllm_engine``: a colocated vLLM engine, weight-synced from the policy before each rollout.

All follow the ``RolloutEngine`` protocol of ``base``.
"""
from algos.rollout.base import RolloutEngine, SamplingParams, mask_top_k_top_p, response_mask_from_ids
from algos.rollout.hf import HFGenerateEngine

__all__ = ["HFGenerateEngine", "RolloutEngine", "SamplingParams", "mask_top_k_top_p", "response_mask_from_ids"]
