"""The LYNX exit probe: standardise -> MLP (256, 64) ReLU -> logit of "safe to exit".

Follows the reference (LYNX, arXiv 2512.05325; ``farukakgul/LYNX`` pickles a scikit-learn
StandardScaler + MLPClassifier): hidden layers (256, 64), ReLU, no dropout, Adam lr 1e-3, L2 1e-4
(here Adam's ``weight_decay``), batches of at most 200, up to 500 epochs, early stopping after 10
epochs without improvement on a stratified 20% validation split. The loss is binary cross-entropy
with class-balanced weights ``w_c = n / (2 n_c)`` (n_c counted on the training split); the
validation criterion is the same weighted loss, and the weights of the best epoch are kept.

The standardisation (mean and std of the training features) lives in the module as buffers, so the
saved safetensors file is the whole probe.
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn


class ExitProbe(nn.Module):
    """``logit = MLP((x - mean) / std)``; ``predict_proba`` gives p = P(safe to exit)."""

    def __init__(self, input_dim: int, hidden: tuple[int, ...] = (256, 64)):
        super().__init__()
        self.input_dim = int(input_dim)
        self.hidden = tuple(int(h) for h in hidden)
        self.register_buffer("mean", torch.zeros(self.input_dim))
        self.register_buffer("std", torch.ones(self.input_dim))
        layers: list[nn.Module] = []
        width = self.input_dim
        for h in self.hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    @torch.no_grad()
    def set_standardisation(self, features: torch.Tensor, eps: float = 1e-6) -> None:
        """Store the mean and std (population, floored at ``eps``) of ``features`` (N, D)."""
        features = features.to(torch.float32)
        self.mean.copy_(features.mean(0))
        self.std.copy_(features.std(0, unbiased=False).clamp_min(eps))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits (N,) for features (N, D); any float dtype and device in, float32 out on the probe's device."""
        x = (features.to(self.mean.device, self.mean.dtype) - self.mean) / self.std
        return self.mlp(x).squeeze(-1)

    @torch.no_grad()
    def predict_proba(self, features: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self(features))


def roc_auc(scores, labels) -> float:
    """Rank-based ROC AUC (Mann-Whitney U / (n_pos n_neg)), ties counted as 1/2; NaN if a class is absent.

    AUC = (sum of the positives' average ranks - n_pos (n_pos + 1) / 2) / (n_pos n_neg).
    """
    s = np.asarray(torch.as_tensor(scores).detach().cpu().double())
    y = np.asarray(torch.as_tensor(labels).detach().cpu()).astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    first_rank = np.cumsum(counts) - counts + 1  # rank of the first member of each tie group
    avg_rank = first_rank + (counts - 1) / 2.0
    ranks = avg_rank[inverse]
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def class_balanced_weights(labels: torch.Tensor) -> tuple[float, float]:
    """``(w_neg, w_pos)`` with ``w_c = n / (2 n_c)``."""
    n = labels.numel()
    n_pos = int(labels.sum().item())
    n_neg = n - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"the probe needs both labels; got {n_pos} safe and {n_neg} continue events")
    return n / (2.0 * n_neg), n / (2.0 * n_pos)


@dataclass
class ProbeTrainConfig:
    hidden: tuple[int, ...] = (256, 64)
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 200
    max_epochs: int = 500
    patience: int = 10
    val_fraction: float = 0.2
    seed: int = 0


def stratified_split(labels: torch.Tensor, fraction: float, generator: torch.Generator):
    """Indices (train, held) with ``round(fraction * n_c)`` (at least 1 when n_c >= 2) of each class held."""
    train, held = [], []
    for cls in (0, 1):
        idx = torch.nonzero(labels == cls).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=generator)]
        k = int(round(fraction * idx.numel()))
        if idx.numel() >= 2:
            k = min(max(k, 1), idx.numel() - 1)
        else:
            k = 0
        held.append(idx[:k])
        train.append(idx[k:])
    return torch.cat(train), torch.cat(held)


def _weighted_bce(logits, y, w_neg, w_pos):
    weights = torch.where(y > 0.5, torch.full_like(y, w_pos), torch.full_like(y, w_neg))
    return nn.functional.binary_cross_entropy_with_logits(logits, y, weight=weights)


def train_probe(features: torch.Tensor, labels: torch.Tensor, config: ProbeTrainConfig | None = None,
                progress=None) -> tuple[ExitProbe, dict]:
    """Fit an :class:`ExitProbe` on (N, D) features and 0/1 labels (1 = safe to exit).

    Returns the probe (best validation epoch, eval mode) and metrics: sizes, positive rate, epochs
    run, best epoch, train/validation weighted loss and AUC. ``progress(epoch, val_loss)`` is
    called after each epoch when given (for a progress bar).
    """
    cfg = config or ProbeTrainConfig()
    x = torch.as_tensor(features, dtype=torch.float32)
    y = torch.as_tensor(labels).to(torch.float32).flatten()
    if x.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"features must be (N, D) with N = len(labels); got {tuple(x.shape)} and {y.shape[0]} labels")
    gen = torch.Generator().manual_seed(cfg.seed)
    train_idx, val_idx = stratified_split(y, cfg.val_fraction, gen)
    if val_idx.numel() == 0:
        raise ValueError("too few events for a validation split: need at least 2 of each label")
    x_tr, y_tr, x_val, y_val = x[train_idx], y[train_idx], x[val_idx], y[val_idx]
    w_neg, w_pos = class_balanced_weights(y_tr)

    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(cfg.seed)
        probe = ExitProbe(x.shape[1], cfg.hidden)
    probe.set_standardisation(x_tr)
    opt = torch.optim.Adam(probe.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    best_loss, best_epoch, best_state, epochs_run = math.inf, -1, None, 0
    for epoch in range(cfg.max_epochs):
        probe.train()
        order = torch.randperm(x_tr.shape[0], generator=gen)
        for start in range(0, order.numel(), cfg.batch_size):
            batch = order[start:start + cfg.batch_size]
            loss = _weighted_bce(probe(x_tr[batch]), y_tr[batch], w_neg, w_pos)
            opt.zero_grad()
            loss.backward()
            opt.step()
        probe.eval()
        with torch.no_grad():
            val_loss = _weighted_bce(probe(x_val), y_val, w_neg, w_pos).item()
        epochs_run = epoch + 1
        if progress is not None:
            progress(epoch, val_loss)
        if val_loss < best_loss - 1e-7:
            best_loss, best_epoch, best_state = val_loss, epoch, copy.deepcopy(probe.state_dict())
        elif epoch - best_epoch >= cfg.patience:
            break
    probe.load_state_dict(best_state)
    probe.eval()
    with torch.no_grad():
        p_tr, p_val = probe.predict_proba(x_tr), probe.predict_proba(x_val)
        train_loss = _weighted_bce(probe(x_tr), y_tr, w_neg, w_pos).item()
    metrics = {
        "num_train": int(x_tr.shape[0]), "num_val": int(x_val.shape[0]),
        "positive_rate": float(y.mean().item()), "epochs": epochs_run, "best_epoch": best_epoch + 1,
        "train_loss": train_loss, "val_loss": best_loss,
        "train_auc": roc_auc(p_tr, y_tr), "val_auc": roc_auc(p_val, y_val),
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()},
    }
    return probe, metrics


__all__ = ["ExitProbe", "ProbeTrainConfig", "class_balanced_weights", "roc_auc", "stratified_split", "train_probe"]
