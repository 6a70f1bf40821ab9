"""Held-out evaluation of a router: accuracy routed vs unrouted, and layers executed.

Both runs generate greedily from the same left-padded prompt batches: unrouted = the dense path
[0 .. L-1] (identical to HF ``generate``), routed = the router deciding every block once per
sequence at prefill (``decide``) with the p knob, the path reused for every decoding step.
Accuracy = mean of ``is_correct(completion, gold)``; layers executed per sequence = sum_l a_l.
"""
from __future__ import annotations

import statistics
from collections.abc import Sequence

import torch

from rewards.verify import is_correct
from routers.path_eval import encode_left_padded
from routers.routed_model import RoutedModel
from routers.router import PURE_ROUTER_P, PathRouter


@torch.no_grad()
def evaluate_routing(routed: RoutedModel, tokenizer, router: PathRouter, prompts: Sequence[str],
                     answers: Sequence[str], max_new_tokens: int = 15, require_boxed: bool = True,
                     batch_size: int = 8, p: float = PURE_ROUTER_P, progress: bool = False) -> dict:
    """Accuracy routed vs unrouted on (prompt, gold) pairs; mean layers executed vs L."""
    from tqdm.auto import tqdm

    if len(prompts) != len(answers) or not prompts:
        raise ValueError(f"need as many answers as prompts (and at least one), got {len(answers)} and {len(prompts)}")
    dense_ok, routed_ok, layers, paths = [], [], [], []
    dense_path = list(range(routed.num_layers))
    for start in tqdm(range(0, len(prompts), batch_size), desc="held-out eval", unit="batch",
                      disable=not progress, dynamic_ncols=True):
        ids, mask = encode_left_padded(tokenizer, prompts[start:start + batch_size], routed.device)
        golds = answers[start:start + batch_size]
        for decide, actions, sink in ((None, dense_path, dense_ok), (router.decider(p), None, routed_ok)):
            out = routed.generate(ids, mask, actions=actions, decide=decide, max_new_tokens=max_new_tokens,
                                  pad_token_id=tokenizer.pad_token_id)
            texts = tokenizer.batch_decode(out.sequences[:, ids.shape[1]:], skip_special_tokens=True)
            sink.extend(bool(is_correct(t, str(g), require_boxed)) for t, g in zip(texts, golds))
            if decide is not None:
                layers.extend(out.layers_executed.tolist())
                paths.extend(out.actions.tolist())
    n = len(prompts)
    return {
        "examples": n, "num_layers": routed.num_layers, "p": p,
        "accuracy_unrouted": sum(dense_ok) / n, "accuracy_routed": sum(routed_ok) / n,
        "fixed": sum(r and not d for d, r in zip(dense_ok, routed_ok)),
        "broken": sum(d and not r for d, r in zip(dense_ok, routed_ok)),
        "mean_layers_routed": statistics.mean(layers),
        "skips": sum(row.count(0) for row in paths), "repeats": sum(row.count(2) for row in paths),
        "distinct_paths": len({tuple(row) for row in paths}),
    }
