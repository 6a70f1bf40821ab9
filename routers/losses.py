"""Focal loss with effective-number class weights for router training (Dr.LLM, arXiv 2510.12773).

Class weights (Cui et al., CVPR 2019, "class-balanced loss"): alpha_c proportional to
(1 - beta) / (1 - beta^{n_c}) with beta = 0.999 and n_c the **actual** count of label c in the
training set, normalised so the weights of the classes present sum to the number of classes
(3); a class with no label gets weight 0. Focal loss (Lin et al., 2017), gamma = 2:
L = -mean_i alpha_{y_i} (1 - p_{i, y_i})^gamma log p_{i, y_i}, the mean over (example, block).
"""
from __future__ import annotations

import torch

from routers.paths import NUM_ACTIONS


def label_counts(labels: torch.Tensor, num_classes: int = NUM_ACTIONS, ignore_index: int = -100) -> torch.Tensor:
    """Counts n_c of each class over all entries of ``labels`` (entries equal to ignore_index skipped)."""
    labels = labels.flatten()
    labels = labels[labels != ignore_index]
    return torch.bincount(labels.long(), minlength=num_classes)[:num_classes]


def class_weights_from_counts(counts, beta: float = 0.999) -> torch.Tensor:
    """alpha_c = (1 - beta) / (1 - beta^{n_c}), zero for n_c = 0, normalised to sum to C."""
    counts = torch.as_tensor(counts, dtype=torch.float64)
    present = counts > 0
    if not present.any():
        raise ValueError("class weights need at least one label; the label counts are all zero")
    raw = torch.where(present, (1.0 - beta) / (1.0 - beta ** counts.clamp(min=1)), torch.zeros_like(counts))
    return (raw * counts.numel() / raw.sum()).float()


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: torch.Tensor | None = None,
               gamma: float = 2.0, ignore_index: int = -100) -> torch.Tensor:
    """-mean alpha_y (1 - p_y)^gamma log p_y over entries of ``targets`` != ignore_index.

    ``logits`` (..., C), ``targets`` (...); alpha (C,) or None (all ones)."""
    logits = logits.reshape(-1, logits.shape[-1]).float()
    targets = targets.reshape(-1)
    keep = targets != ignore_index
    logits, targets = logits[keep], targets[keep].long()
    if targets.numel() == 0:
        return logits.sum() * 0.0
    log_p = logits.log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
    weight = (1.0 - log_p.exp()).pow(gamma)
    if alpha is not None:
        weight = weight * alpha.to(logits.device, logits.dtype)[targets]
    return -(weight * log_p).mean()
