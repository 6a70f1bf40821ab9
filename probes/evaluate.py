"""Held-out checks of a LYNX probe: the premature-exit rate against delta, and decoding with vs without exits.

* :func:`premature_exit_rates`: on labelled cue events of held-out problems (collected like the
  calibration events), the rate of exits among events where exiting is wrong (label 0),
  ``P(exit | label 0)``, which split conformal bounds by delta = 1 - c per event under
  exchangeability (LYNX, arXiv 2512.05325), with a bootstrap interval over problems; also the exit
  rate among safe events.
* :func:`evaluate_decoding`: greedy online decoding of held-out problems, once without exits
  (:class:`probes.early_exit.NeverExit`, token for token what ``generate`` gives) and once per
  confidence with the probe attached; accuracy, mean generated tokens (exit string and answer
  included) and exit rate per arm. Answers are graded with :func:`rewards.verify.is_correct`;
  ``require_boxed=False`` (default) lets an answer outside ``\\boxed{}`` count (math_verify's own
  extraction), since a small model often answers without the box and the forced exit always
  boxes, which would otherwise favour the exit arms.
* :func:`recompute_features`: the features of collected events from another model setting (another
  dtype, Dr.LLM routing on), for the same events and labels: ``premature_exit_rates`` on them
  measures how far the conformal bound, calibrated on the collection's features, still holds
  (``scripts/lynx_feature_shift.py``).
"""
from __future__ import annotations

import math
from itertools import product

import torch
from tqdm.auto import tqdm

from algos.data import build_prompt
from algos.hf_compat import cache_arg
from probes.early_exit import NeverExit, lynx_generate
from rewards.metrics import bootstrap_rate_interval
from rewards.verify import is_correct


def _rate(mask: torch.Tensor) -> float:
    return float(mask.float().mean().item()) if mask.numel() else math.nan


@torch.no_grad()
def premature_exit_rates(bundle, events, confidences) -> list[dict]:
    """Per confidence c: delta, thresholds, premature-exit rate P(exit | label 0) with a 95% bootstrap
    interval over problems, exit rate of safe events P(exit | label 1) and overall, on ``events``
    (a :class:`probes.collect.EventSet`)."""
    p = bundle.score(events.features) if len(events) else torch.zeros(0)
    safe = events.labels.bool()
    rows = []
    for c in confidences:
        rule = bundle.rule(c)
        exits = rule.should_exit(p)
        rows.append({"confidence": c, "delta": rule.delta, "q_safe": rule.q_safe, "q_continue": rule.q_continue,
                     "events": len(events), "continue_events": int((~safe).sum()), "safe_events": int(safe.sum()),
                     "premature_exit_rate": _rate(exits[~safe]),
                     "premature_exit_rate_ci95": bootstrap_rate_interval(exits[~safe], events.problem[~safe]),
                     "safe_exit_rate": _rate(exits[safe]), "exit_rate": _rate(exits)})
    return rows


@torch.no_grad()
def recompute_features(model, tokenizer, events, prompts: dict[int, str], responses: dict[int, list[int]],
                       layers) -> torch.Tensor:
    """(N, D) features of ``events`` (a :class:`probes.collect.EventSet`) computed by ``model``.

    Per rollout the prompt is prefilled alone (a :class:`routers.routed_lm.RoutedCausalLM` picks its
    path there, as the decoder does), then the response up to its last event is fed in one forward
    over the cache; event i's features are the hidden states at ``layers`` of response token i, as
    the collection recorded them while generating (same model and dtype: equal up to float noise).
    ``prompts`` / ``responses``: by problem index (:meth:`probes.collect.EventShards.responses`)."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    features = torch.zeros(len(events), len(layers) * model.config.hidden_size)
    for problem in events.problem.unique().tolist():
        rows = torch.nonzero(events.problem == problem).flatten()
        index = events.event_index[rows]
        prompt = tokenizer(prompts[problem], return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)
        response = torch.tensor([responses[problem][: int(index.max()) + 1]], device=device)
        n, m = prompt.shape[1], response.shape[1]
        cache = model.new_cache() if hasattr(model, "new_cache") else DynamicCache(config=model.config)
        model(input_ids=prompt, attention_mask=torch.ones_like(prompt), position_ids=torch.arange(n, device=device)[None],
              **cache_arg(cache), use_cache=True)
        out = model(input_ids=response, attention_mask=torch.ones(1, n + m, dtype=torch.long, device=device),
                    position_ids=torch.arange(n, n + m, device=device)[None], **cache_arg(cache), use_cache=True,
                    output_hidden_states=True)
        features[rows] = torch.cat([out.hidden_states[layer][0, index.to(device)] for layer in layers], -1).float().cpu()
    return features


def sample_seed(seed: int, start: int, sample: int) -> int:
    """Generator seed of the batch starting at problem ``start`` in sampling pass ``sample``
    (pass 0 keeps the single-pass seeds ``seed * 1_000_003 + start``)."""
    return seed * 1_000_003 + start + sample * 100_003


@torch.no_grad()
def evaluate_decoding(model, tokenizer, bundle, records, confidences, *, prompt_template: str,
                      max_new_tokens: int, batch_size: int = 8, stop_at_answer_close: bool = True,
                      require_boxed: bool = False, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                      samples: int = 1, progress: bool = True) -> list[dict]:
    """Decoding of ``records`` without exits and with the probe at each confidence: greedy, or sampled
    at ``temperature`` > 0 with ``top_p`` (how R1-style models are run). Sampled arms draw from the
    same seeded generator per batch, and ``lynx_generate`` draws one token per row at every step
    whatever the rows do, so an exit arm follows the no-exit arm's trajectory up to its exit (a
    paired comparison); the answer after an exit is greedy. ``samples`` > 1 (sampled decoding only)
    decodes every problem that many times per arm, pass s with seeds :func:`sample_seed`.

    Returns one dict per arm, over the ``problems x samples`` rollouts: accuracy, mean new tokens,
    exit rate, and for the exit arms the relative token change against the no-exit arm, the
    rollouts the no-exit arm solves and the exit arm does not (``lost_by_exit``, trajectory-level
    premature exits) and the reverse (``gained_by_exit``), and the accuracy change with its 95%
    percentile bootstrap interval resampling problems (a problem's samples stay together).
    """
    samples = int(samples)
    if samples < 1 or (samples > 1 and temperature <= 0):
        raise ValueError(f"samples must be >= 1, and > 1 only with sampled decoding (temperature > 0); "
                         f"got samples={samples}, temperature={temperature}")
    prompts = [build_prompt(tokenizer, r["question"], prompt_template) for r in records]
    device = next(model.parameters()).device
    arms = [None, *confidences]
    rollouts = len(records) * samples
    bar = tqdm(total=len(arms) * rollouts, desc="evaluate: decoding", unit="rollout", disable=not progress)
    results, base = [], None
    for c in arms:
        correct, tokens, exited, problem = [], [], [], []
        for s, start in product(range(samples), range(0, len(records), batch_size)):
            enc = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True,
                            add_special_tokens=False, padding_side="left")
            ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
            sampling = {}
            if temperature > 0:
                sampling = dict(do_sample=True, temperature=temperature, top_p=top_p,
                                generator=torch.Generator(device=device).manual_seed(sample_seed(seed, start, s)))
            if c is None:
                out = lynx_generate(model, tokenizer, ids, mask, policy=NeverExit(), cue_config=bundle.cue_config,
                                    max_new_tokens=max_new_tokens, **sampling)
            else:
                out = lynx_generate(model, tokenizer, ids, mask, probe=bundle, confidence=c,
                                    max_new_tokens=max_new_tokens, stop_at_answer_close=stop_at_answer_close,
                                    **sampling)
            width = ids.shape[1]
            for b, stats in enumerate(out.stats):
                text = tokenizer.decode(out.sequences[b, width:width + stats.new_tokens], skip_special_tokens=True)
                correct.append(is_correct(text, records[start + b]["answer"], require_boxed=require_boxed))
                tokens.append(stats.new_tokens)
                exited.append(stats.exited)
                problem.append(start + b)
            bar.update(len(out.stats))
        row = {"arm": "no exit" if c is None else f"c={c}", "confidence": c, "problems": len(records),
               "samples": samples, "accuracy": sum(correct) / rollouts, "mean_new_tokens": sum(tokens) / rollouts,
               "exit_rate": sum(exited) / rollouts}
        if base is None:
            base = (correct, row["mean_new_tokens"])
        else:
            row["token_change"] = row["mean_new_tokens"] / base[1] - 1 if base[1] else math.nan
            row["lost_by_exit"] = sum(1 for b, x, e in zip(base[0], correct, exited) if b and e and not x)
            row["gained_by_exit"] = sum(1 for b, x, e in zip(base[0], correct, exited) if not b and e and x)
            change = torch.tensor(correct, dtype=torch.float32) - torch.tensor(base[0], dtype=torch.float32)
            row["accuracy_change"] = float(change.mean())
            row["accuracy_change_ci95"] = bootstrap_rate_interval(change, torch.tensor(problem))
        results.append(row)
    bar.close()
    return results


__all__ = ["bootstrap_rate_interval", "evaluate_decoding", "premature_exit_rates", "recompute_features", "sample_seed"]
