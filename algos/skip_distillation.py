"""Skip distillation while fine-tuning: the dense model teaches its own paths with blocks skipped.

Each training step runs the batch twice with the same weights, once through every block (the dense path) and
once with a skip set S drawn from the given ones (uniformly, seeded), and minimises

    L = CE(y | dense) + λ · KL(sg(p_dense) ‖ p_S)
    KL(p ‖ q) = Σ_t m_t Σ_v p_t(v) (log p_t(v) − log q_t(v)) / N      (N labelled tokens, m_t their mask)

so the dense path keeps learning the data while each skipped path learns to give the dense path's distribution
(sg: no gradient through the teacher). This is inplace distillation (Yu & Huang, "Universally Slimmable
Networks", arXiv 1903.05134: the full network trained on the labels, its sub-networks on its soft predictions)
applied to depth, as DynaBERT distils depth-reduced sub-networks from the full one (Hou et al., arXiv 2004.04037).
A router (Dr.LLM, ``routers/``) can then skip those blocks at inference: on the thinking default, skipping
blocks 3 and 4 broke every answer before and kept nearly all of them after (README, "The thinking default
model"). Unlike layer dropout (:mod:`algos.layer_dropout`), the dense path is trained on every step, so it does
not lose accuracy; a step costs two forward and backward passes.
"""
from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import torch

from algos.config import ConfigError
from algos.layer_dropout import blocks_skipped_where, parse_blocks


def parse_skip_sets(text: str, num_layers: int | None = None) -> list[tuple[int, ...]]:
    """``"3,4;3-4,6"`` -> [(3, 4), (3, 4, 6)]: skip sets separated by ';', each as :func:`parse_blocks` reads it."""
    sets = [tuple(parse_blocks(part, num_layers, what="skip distillation sets")) for part in text.split(";")
            if part.strip()]
    if not sets:
        raise ConfigError(f"no skip set in {text!r}; write them like '3,4;3,4,6'")
    if num_layers is not None and any(len(s) >= num_layers for s in sets):
        raise ConfigError(f"a skip set in {text!r} skips every block; keep at least one")
    return list(dict.fromkeys(sets))


def distillation_kl(teacher_log_probs: torch.Tensor, student_log_probs: torch.Tensor, mask: torch.Tensor,
                    num_tokens) -> torch.Tensor:
    """KL(sg(p_teacher) ‖ p_student) summed over the vocabulary and the masked positions, over ``num_tokens``.
    Log-probabilities are [B, T, V], ``mask`` [B, T]; no gradient reaches the teacher."""
    teacher = teacher_log_probs.detach()
    per_token = (teacher.exp() * (teacher - student_log_probs)).sum(-1)
    return (per_token * mask).sum() / torch.as_tensor(num_tokens).clamp(min=1)


@contextlib.contextmanager
def skippable_blocks(model) -> Iterator[set[int]]:
    """Within the block, every decoder block of ``model`` whose index is in the yielded set returns its input
    unchanged (no compute, no gradient); the set starts empty (the dense path) and the caller fills it. The
    blocks' own ``forward`` is restored on exit (:func:`algos.layer_dropout.blocks_skipped_where`)."""
    skipped: set[int] = set()
    with blocks_skipped_where(model, lambda index, layer: index in skipped):
        yield skipped


class SkipSetSampler:
    """One skip set per training step, uniformly from ``sets`` with its own seeded generator (every process
    of a distributed run draws the same sets)."""

    def __init__(self, sets: list[tuple[int, ...]], seed: int = 0):
        self.sets, self._random = sets, random.Random(seed)

    def draw(self) -> tuple[int, ...]:
        return self._random.choice(self.sets)


__all__ = ["SkipSetSampler", "distillation_kl", "parse_skip_sets", "skippable_blocks"]
