"""REPRO process reward: entropy-selected, likelihood-based dual score of a chain of thought.

Source: Liu et al., "Rectifying LLM Thought from Lens of Optimization", arXiv 2512.01925
(spec and departures from the reference code: the project's ``papers/repro.md``).

For each rollout:

1. the thinking region is the response before the end-of-thinking marker (``</think>``), or the
   whole response (trailing EOS/padding excluded) when the model does not emit one;
2. it is cut into segments at line breaks (detected from decoded token text); the first tokens of
   segments are candidates, and the ``top_k`` with the highest policy entropy (``batch.entropies``,
   from the rollout) are scored, plus point 0 (baseline) and the end of thinking;
3. J(t) = mean log-prob of ``answer_template.format(answer=...)`` after ``prompt + response[:t]``
   under the current policy, every point in one packed forward pass per micro-batch
   (:mod:`rewards.repro_packing`);
4. dual score S_j = (1 - w)(1 - tanh(L_j / L_b)) + w (tau_b(J_1..J_j) + 1) / 2, L = -J
   (:func:`rewards.repro_scoring.dual_scores`);
5. process rewards r_1 = S_1 - S_b, r_j = S_j - S_{j-1} (they sum to the net progress S_n - S_b,
   S_b = ``empty_score()``, the score of the empty prefix), r_j on the last token of its segment:
   response position t_j - 1 for the point with prefix t_j.

The output is token-level and unnormalised; :func:`algos.process_advantages.repro_advantage`
turns it into the Ã_t term of ``A_t = A_outcome,t + alpha * Ã_t``.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from algos.batch import RolloutBatch
from rewards.repro_packing import (
    ScoringRequest,
    answer_logprob_packed,
    answer_logprob_separate,
    build_packed_batch,
)
from rewards.repro_scoring import (
    baseline_magnitude,
    dual_scores,
    kendall_tau,
    line_break_flags,
    select_points,
    step_rewards,
    thinking_length,
)

__all__ = [
    "ReproConfig",
    "ReproOutput",
    "ReproReward",
    "ScoringRequest",
    "answer_logprob_packed",
    "answer_logprob_separate",
    "build_packed_batch",
    "baseline_magnitude",
    "dual_scores",
    "kendall_tau",
    "line_break_flags",
    "select_points",
    "step_rewards",
    "thinking_length",
]


@dataclass
class ReproConfig:
    """REPRO settings.

    top_k: line-break candidates kept per rollout by entropy (paper: 10/20/30, default 20);
        None keeps them all.
    stability_weight: w in S = (1 - w) * magnitude + w * stability (the reference code uses 0).
    ema: smoothing factor beta of J before the Kendall tau (None: no smoothing).
    answer_template: how the ground truth is written after the prefix; ``{answer}`` is replaced.
    think_end_marker: end of the thinking region; None/"" scores the whole response.
    micro_batch_size: rollouts per packed forward pass (bounds memory: the mask is (B, L, L)).
    """

    top_k: int | None = 20
    stability_weight: float = 0.1
    ema: float | None = None
    answer_template: str = "\\boxed{{{answer}}}"
    think_end_marker: str | None = "</think>"
    micro_batch_size: int = 8

    def __post_init__(self):
        if not 0.0 <= self.stability_weight <= 1.0:
            raise ValueError(f"stability_weight must be in [0, 1], got {self.stability_weight}")
        if self.ema is not None and not 0.0 <= self.ema < 1.0:
            raise ValueError(f"ema must be None or in [0, 1), got {self.ema}")
        if self.micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {self.micro_batch_size}")
        if "{answer}" not in self.answer_template.replace("{{", "").replace("}}", ""):
            raise ValueError(f"answer_template must contain '{{answer}}', got {self.answer_template!r}")


@dataclass
class ReproOutput:
    """token_rewards (B, T) float32 and reward_mask (B, T) bool, aligned to ``response_ids``;
    final_score (B,) float32 (S at the end of thinking); per-rollout ``points`` (prefix lengths)
    and ``J`` values; ``stats`` of floats for logging."""

    token_rewards: torch.Tensor
    reward_mask: torch.Tensor
    final_score: torch.Tensor
    stats: dict[str, float] = field(default_factory=dict)
    points: list[list[int]] = field(default_factory=list)
    J: list[torch.Tensor] = field(default_factory=list)



@contextmanager
def _eval_mode(model: nn.Module):
    """Eval mode for the call; every submodule gets its own training flag back afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, was_training in flags:
            m.training = was_training


class ReproReward:
    """REPRO process reward over a :class:`~algos.batch.RolloutBatch`.

    ``reward(model, tokenizer, batch, answers)`` scores every rollout with the *current* policy
    ``model`` (an ``nn.Module``: pass ``accelerator.unwrap_model(model)``; PEFT models work), without
    gradients, in eval mode (each module's training flag is restored afterwards), on the model's
    device. ``answers`` defaults to ``batch.extras["answer"]``.
    """

    def __init__(self, config: ReproConfig | None = None, **overrides):
        if config is None:
            config = ReproConfig(**overrides)
        elif overrides:
            raise TypeError("pass either a ReproConfig or keyword overrides, not both")
        self.config = config

    def empty_score(self) -> float:
        """Final score of a rollout with an empty thinking region: S of a point that made no
        progress and has no trend, (1 - w)(1 - tanh 1) + w/2."""
        w = self.config.stability_weight
        return (1.0 - w) * baseline_magnitude() + w * 0.5

    def _segments(self, tokenizer, batch: RolloutBatch):
        """Per rollout: its response ids (no padding), thinking length and line-break flags."""
        lengths = batch.response_mask.sum(dim=-1).tolist()
        for b in range(batch.response_ids.shape[0]):
            ids = batch.response_ids[b, : int(lengths[b])].tolist()
            think = thinking_length(tokenizer, ids, self.config.think_end_marker)
            yield ids, think, line_break_flags(tokenizer, ids[:think])

    def needs_entropies(self, tokenizer, batch: RolloutBatch) -> bool:
        """Whether ``batch.entropies`` decide any rollout's points: some rollout has more candidates
        (line breaks inside its thinking, :func:`select_points`) than ``top_k``. When none has, every
        candidate is scored and the entropies are never read, so a trainer whose rollout engine reports
        none (vLLM) need not run a forward pass to measure them."""
        k = self.config.top_k
        if k is None or k <= 0:  # every candidate kept, or none
            return False
        return any(sum(flags[: think - 1]) > k for _, think, flags in self._segments(tokenizer, batch))

    def plan(
        self, tokenizer, batch: RolloutBatch, answers: list[str]
    ) -> tuple[list[list[int]], list[int], list[ScoringRequest]]:
        """Scoring points of every rollout, and the requests (with their row) to run.

        Rollouts with an empty thinking region get points ``[0]`` and no request.
        """
        cfg = self.config
        B = batch.response_ids.shape[0]
        if len(answers) != B:
            raise ValueError(f"got {len(answers)} answers for {B} rollouts")
        all_points, rows, requests = [], [], []
        for b, (ids, think, flags) in enumerate(self._segments(tokenizer, batch)):
            points = select_points(flags, batch.entropies[b, :think], think, cfg.top_k)
            all_points.append(points)
            if think == 0:
                continue
            prompt = batch.prompt_ids[b][batch.prompt_mask[b].bool()].tolist()
            text = cfg.answer_template.format(answer=str(answers[b]).strip())
            answer_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            rows.append(b)
            requests.append(ScoringRequest(prompt, ids[:think], points, answer_ids))
        return all_points, rows, requests

    @torch.no_grad()
    def __call__(
        self, model: nn.Module, tokenizer, batch: RolloutBatch, answers: list[str] | None = None
    ) -> ReproOutput:
        start = time.perf_counter()
        cfg = self.config
        if answers is None:
            if "answer" not in batch.extras:
                raise ValueError(
                    "REPRO needs ground-truth answers: pass answers= or an 'answer' column in batch.extras"
                )
            answers = batch.extras["answer"]
        all_points, rows, requests = self.plan(tokenizer, batch, answers)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        with _eval_mode(model):
            Js = answer_logprob_packed(model, requests, micro_batch_size=cfg.micro_batch_size, pad_id=pad_id)

        B, T = batch.response_ids.shape
        device = batch.response_ids.device
        token_rewards = torch.zeros((B, T), dtype=torch.float32)
        reward_mask = torch.zeros((B, T), dtype=torch.bool)
        final_score = torch.full((B,), self.empty_score(), dtype=torch.float32)
        J_per_row: list[torch.Tensor] = [torch.empty(0) for _ in range(B)]
        magnitudes, stabilities, J_base, J_final = [], [], [], []
        for b, req, J in zip(rows, requests, Js):
            magnitude, stability, score = dual_scores(J, cfg.stability_weight, cfg.ema)
            positions = torch.tensor(req.points[1:], dtype=torch.long) - 1  # last token of each segment
            token_rewards[b, positions] = step_rewards(score, self.empty_score()).float()
            reward_mask[b, positions] = True
            final_score[b] = float(score[-1])
            J_per_row[b] = J
            magnitudes.append(magnitude)
            stabilities.append(stability)
            J_base.append(float(J[0]))
            J_final.append(float(J[-1]))

        rewarded = token_rewards[reward_mask]
        cat = lambda xs: torch.cat(xs) if xs else torch.zeros(0, dtype=torch.float64)  # noqa: E731
        mean = lambda x: float(x.mean()) if x.numel() else 0.0  # noqa: E731
        stats = {
            "magnitude_mean": mean(cat(magnitudes)),
            "stability_mean": mean(cat(stabilities)),
            "score_final_mean": mean(final_score),
            "points_mean": float(sum(len(p) for p in all_points) / max(B, 1)),
            "process_reward_mean": mean(rewarded),
            "process_reward_std": float(rewarded.std()) if rewarded.numel() > 1 else 0.0,
            "J_baseline_mean": mean(torch.tensor(J_base)),
            "J_final_mean": mean(torch.tensor(J_final)),
            "thinking_tokens_mean": float(sum(p[-1] for p in all_points) / max(B, 1)),
            "seconds": time.perf_counter() - start,
        }
        return ReproOutput(
            token_rewards=token_rewards.to(device),
            reward_mask=reward_mask.to(device),
            final_score=final_score.to(device),
            stats=stats,
            points=all_points,
            J=J_per_row,
        )
