"""Router training on MCTS targets: teacher forcing, focal loss, held-out metrics (Dr.LLM, arXiv 2510.12773).

Teacher forcing: the frozen base runs each block as many times as the target label says
(:class:`RoutedModel` with ``actions = labels``); router l reads the hidden states entering
block l along that path. Because the base is frozen and the path is the target (not the
router's own decisions), those inputs do not depend on the routers, so we run the base once
per example and cache each block's window means (N, L, W, d); training then only runs the
routers. Pooling covers the prompt tokens, which is what the router sees at inference (it
decides once at prefill); the paper pools over prompt + answer during training.

Loss: focal loss, gamma = 2, class weights from the actual label counts of the training split
(beta = 0.999, :mod:`routers.losses`), mean over (example, block). Optimiser: AdamW, lr 1e-3,
weight decay 0.01, linear warmup then cosine decay to 0 (per step). Metrics on the held-out
split: accuracy over all (example, block) decisions, per-block accuracy, macro-F1 over the
classes present in labels or predictions, exact-path rate, and the always-execute baseline.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from algos.device import module_device
from routers.losses import class_weights_from_counts, focal_loss, label_counts
from routers.path_eval import encode_left_padded
from routers.paths import EXECUTE, NUM_ACTIONS
from routers.routed_model import RoutedModel
from routers.router import PathRouter, window_pool


@dataclass
class RouterTrainConfig:
    epochs: int = 20
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    batch_size: int = 16
    gamma: float = 2.0
    beta: float = 0.999
    seed: int = 0


@dataclass
class RoutingData:
    """Cached router inputs: window means (N, L, W, d), validity (N, L, W), labels (N, L)."""

    pooled: torch.Tensor
    valid: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.labels.shape[0]

    def subset(self, idx) -> RoutingData:
        idx = torch.as_tensor(idx, dtype=torch.long)
        return RoutingData(self.pooled[idx], self.valid[idx], self.labels[idx])


@torch.no_grad()
def teacher_forced_features(routed: RoutedModel, tokenizer, prompts: Sequence[str], labels: Sequence[Sequence[int]],
                            num_windows: int = 8, batch_size: int = 8, progress: bool = False) -> RoutingData:
    """Window means of the hidden states entering every block, the base run along each
    example's target path (``labels`` = per-block counts) over its prompt."""
    from tqdm.auto import tqdm

    if len(prompts) != len(labels) or not prompts:
        raise ValueError(f"need as many label rows as prompts (and at least one), got {len(labels)} and {len(prompts)}")
    pooled_rows, valid_rows = [], []
    for start in tqdm(range(0, len(prompts), batch_size), desc="router features", unit="batch",
                      disable=not progress, dynamic_ncols=True):
        ids, mask = encode_left_padded(tokenizer, prompts[start:start + batch_size], routed.device)
        table = torch.tensor([list(r) for r in labels[start:start + batch_size]], dtype=torch.long)
        per_layer: list[tuple[torch.Tensor, torch.Tensor]] = []

        def hook(layer_idx, hidden, token_mask):
            pooled, valid = window_pool(hidden.float(), token_mask, num_windows)
            per_layer.append((pooled.cpu(), valid.cpu()))

        routed(ids, mask, actions=table, block_hook=hook, logits_to_keep=1)
        pooled_rows.append(torch.stack([p for p, _ in per_layer], dim=1))
        valid_rows.append(torch.stack([v for _, v in per_layer], dim=1))
    return RoutingData(torch.cat(pooled_rows), torch.cat(valid_rows),
                       torch.tensor([list(r) for r in labels], dtype=torch.long))


def split_indices(n: int, val_fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """Seeded shuffle of range(n) into (train, held-out); held-out gets round(n * fraction),
    at least 1 when fraction > 0 and n >= 2, and train keeps at least 1."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = round(n * val_fraction)
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    return sorted(order[n_val:]), sorted(order[:n_val])


def cosine_with_warmup(optimizer, warmup_steps: int, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """lr factor: (s + 1) / warmup for s < warmup, then 0.5 (1 + cos(pi (s - warmup) / (total - warmup)))."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def routing_metrics(pred: torch.Tensor, labels: torch.Tensor) -> dict:
    """Decision metrics for (N, L) predicted and target actions.

    macro-F1 = mean over classes c in labels u predictions of 2 TP_c / (2 TP_c + FP_c + FN_c)."""
    right = pred == labels
    f1 = {}
    for c in range(NUM_ACTIONS):
        tp = int(((pred == c) & (labels == c)).sum())
        fp = int(((pred == c) & (labels != c)).sum())
        fn = int(((pred != c) & (labels == c)).sum())
        if tp + fp + fn:
            f1[c] = 2 * tp / (2 * tp + fp + fn)
    return {
        "examples": int(labels.shape[0]),
        "layer_accuracy": float(right.float().mean()),
        "per_layer_accuracy": [round(float(a), 4) for a in right.float().mean(0)],
        "macro_f1": sum(f1.values()) / len(f1),
        "f1_per_class": {str(c): round(v, 4) for c, v in f1.items()},
        "path_exact": float(right.all(1).float().mean()),
        "always_execute_accuracy": float((labels == EXECUTE).float().mean()),
        "mean_layers_predicted": float(pred.sum(1).float().mean()),
        "mean_layers_target": float(labels.sum(1).float().mean()),
    }


@torch.no_grad()
def predict(router: PathRouter, data: RoutingData) -> torch.Tensor:
    """(N, L) argmax actions of the routers on cached (teacher-forced) inputs (on the CPU)."""
    device = module_device(router)
    return router.all_logits(data.pooled.to(device), data.valid.to(device)).argmax(-1).cpu()


def train_router(router: PathRouter, train: RoutingData, val: RoutingData | None = None,
                 config: RouterTrainConfig | None = None, progress: bool = False) -> dict:
    """Train ``router`` in place on cached inputs; returns losses, class weights and metrics."""
    from tqdm.auto import tqdm

    cfg = config or RouterTrainConfig()
    if len(train) == 0:
        raise ValueError("no training examples for the router (every searched example was dropped?)")
    counts = label_counts(train.labels)
    alpha = class_weights_from_counts(counts, cfg.beta)
    torch.manual_seed(cfg.seed)
    optimizer = torch.optim.AdamW(router.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    scheduler = cosine_with_warmup(optimizer, round(cfg.warmup_ratio * total), total)
    gen = torch.Generator().manual_seed(cfg.seed)
    device = module_device(router)  # the cached inputs stay on the CPU; batches move to the router
    losses = []
    router.train()
    bar = tqdm(range(cfg.epochs), desc="router training", unit="epoch", disable=not progress, dynamic_ncols=True)
    for _ in bar:
        order = torch.randperm(len(train), generator=gen)
        epoch_loss = 0.0
        for start in range(0, len(train), cfg.batch_size):
            batch = train.subset(order[start:start + cfg.batch_size])
            logits = router.all_logits(batch.pooled.to(device), batch.valid.to(device))
            loss = focal_loss(logits, batch.labels.to(device), alpha.to(device), cfg.gamma)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            epoch_loss += loss.item() * len(batch)
        losses.append(epoch_loss / len(train))
        bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
    router.eval()
    metrics = {"config": asdict(cfg), "label_counts": counts.tolist(),
               "class_weights": [round(float(w), 6) for w in alpha], "epoch_losses": [round(x, 6) for x in losses],
               "train": routing_metrics(predict(router, train), train.labels)}
    if val is not None and len(val):
        metrics["val"] = routing_metrics(predict(router, val), val.labels)
    return metrics
