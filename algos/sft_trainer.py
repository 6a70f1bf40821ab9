"""TRL's ``SFTTrainer`` with a loss that projects only labelled positions onto the vocabulary (CPU).

TRL computes the SFT loss through a chunked, fused LM head (``trl/kernels/chunked_logprob.py``) that
never builds the full logits: on CUDA it runs Triton kernels on the labelled positions only. Elsewhere it
falls back to per-tile torch ops over *every* position, prompt and padding included, and recomputes the
projection in the backward pass; on a 2-core CPU that was 44% of a step of the thinking-model build.

:class:`LabelWindowSFTTrainer` keeps TRL's loss, ``L = −Σ_t log p(y_t) / N`` over the completion tokens
(``N`` the labelled tokens, or ``num_items_in_batch`` under gradient accumulation), but asks the model
for logits only over the window from the batch's first label to its end (``logits_to_keep``) and uses
torch's own log-softmax. It logs the same ``entropy`` and ``mean_token_accuracy`` as TRL. The window's
logits are held for the backward pass, so it suits small vocabularies × short windows (a CPU run);
:func:`algos.sft.run_sft` uses it for fp32 training on a CPU (bf16 builds keep TRL's head, whose bytes the
reference build of the thinking default has). On an AVX2 CPU it took the thinking build from 9 min 19 s to
6 min 59 s (2 cores; the weights agree with TRL's to 2e-5 in relative norm).

:class:`SkipDistillationSFTTrainer` adds skip distillation (:mod:`algos.skip_distillation`): a second pass of
the batch with a skip set drawn per step, trained towards the dense pass's distribution.
"""
from __future__ import annotations

import torch
from trl import SFTTrainer


class LabelWindowSFTTrainer(SFTTrainer):
    """``SFTTrainer`` whose loss needs logits only from the first labelled position on."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        log_probs, targets, mask, outputs = self._window_log_probs(model, inputs)
        loss = self._cross_entropy(log_probs, targets, mask, self._token_count(mask, num_items_in_batch))
        self._log_token_metrics(log_probs.detach(), targets, mask, inputs)
        return (loss, outputs) if return_outputs else loss

    @staticmethod
    def _window_log_probs(model, inputs):
        """Log-probabilities [B, W, V] over the window from the batch's first label to its end, the targets
        and their mask [B, W] (-100 = no label), and the model's outputs."""
        labels = inputs["labels"]
        labelled = (labels != -100).any(dim=0).nonzero()
        first = int(labelled[0]) if len(labelled) else labels.size(1) - 1  # the first position with a label
        model_inputs = {k: v for k, v in inputs.items() if k not in ("labels", "completion_mask")}
        # Position t predicts token t + 1: keep the logits of positions first - 1 … end, drop the last one.
        outputs = model(**model_inputs, use_cache=False, logits_to_keep=labels.size(1) - first + 1)
        targets = labels[:, first:]
        return outputs.logits[:, :-1].float().log_softmax(dim=-1), targets, targets != -100, outputs

    @staticmethod
    def _cross_entropy(log_probs, targets, mask, num_tokens) -> torch.Tensor:
        """L = −Σ_t log p(y_t) / N over the labelled positions."""
        token_log_probs = log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return -(token_log_probs * mask).sum() / num_tokens

    def _token_count(self, mask, num_items_in_batch) -> torch.Tensor:
        """N in L = Σ / N: the labelled tokens, or ``num_items_in_batch`` under gradient accumulation, divided
        by the processes where TRL multiplies the loss by them (DDP averages the gradients across ranks)."""
        num_tokens = torch.as_tensor(mask.sum() if num_items_in_batch is None else num_items_in_batch).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            num_tokens = num_tokens / self.accelerator.num_processes
        return num_tokens

    def _log_token_metrics(self, log_probs, targets, mask, inputs) -> None:
        """TRL's metrics: mean entropy and top-1 accuracy over labelled tokens, tokens seen so far."""
        mode = "train" if self.model.training else "eval"
        entropy = -(log_probs.exp() * log_probs).sum(-1)
        correct = (log_probs.argmax(-1) == targets) & mask
        gather = self.accelerator.gather_for_metrics
        num_valid = gather(mask.sum()).sum()
        if num_valid > 0:
            self._metrics[mode]["entropy"].append((gather((entropy * mask).sum()).sum() / num_valid).item())
            self._metrics[mode]["mean_token_accuracy"].append((gather(correct.sum()).sum() / num_valid).item())
        if mode == "train":
            seen = inputs["attention_mask"].sum() if "attention_mask" in inputs else inputs["input_ids"].new_tensor(
                inputs["input_ids"].numel())  # padding-free batches carry no mask
            self._total_train_tokens += gather(seen).sum().item()
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]


class SkipDistillationSFTTrainer(LabelWindowSFTTrainer):
    """The window loss on the dense path plus λ · KL(sg(p_dense) ‖ p_S) for a skip set S drawn per step
    (:mod:`algos.skip_distillation`, formula there). ``skipped`` is the set yielded by
    :func:`algos.skip_distillation.skippable_blocks`, which must be active while training."""

    def __init__(self, *args, skipped: set[int], sampler, weight: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.skipped, self.sampler, self.weight = skipped, sampler, weight

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        from algos.skip_distillation import distillation_kl

        self.skipped.clear()
        dense, targets, mask, outputs = self._window_log_probs(model, inputs)
        num_tokens = self._token_count(mask, num_items_in_batch)
        ce = self._cross_entropy(dense, targets, mask, num_tokens)
        self.skipped.update(self.sampler.draw())
        try:
            student = self._window_log_probs(model, inputs)[0]
        finally:
            self.skipped.clear()
        kl = distillation_kl(dense, student, mask, num_tokens)
        self._log_token_metrics(dense.detach(), targets, mask, inputs)
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["skip_kl"].append(self.accelerator.gather_for_metrics(kl.detach()).mean().item())
        loss = ce + self.weight * kl
        return (loss, outputs) if return_outputs else loss
