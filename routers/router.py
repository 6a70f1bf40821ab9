"""Per-block routers with windowed mean pooling (Dr.LLM, arXiv 2510.12773, Sec. "Router").

Router r_l reads the hidden states entering block l along the routed path (no extra norm):
the T prompt tokens are cut into W = min(W_max, T) windows of size floor(T / W) (tail
dropped), each window is mean-pooled, r_l(x) = Linear(128, 3)(GELU_tanh(Linear(d, 128)(x)))
is applied per window and the logits are averaged over windows; argmax gives 0 skip,
1 execute, 2 repeat. One decision per block per sequence, made at prefill.
"""
from __future__ import annotations

import torch
from torch import nn

from routers.paths import EXECUTE, NUM_ACTIONS, REPEAT, SKIP

DEFAULT_WINDOWS = 8
DEFAULT_ROUTER_HIDDEN = 128
PURE_ROUTER_P = -0.5  # the p knob value at which the router alone decides


class BlockRouter(nn.Module):
    """Linear(d, h) -> GELU(tanh) -> Linear(h, 3); Xavier-uniform weights, zero biases."""

    def __init__(self, hidden_size: int, router_hidden: int = DEFAULT_ROUTER_HIDDEN):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden_size, router_hidden), nn.GELU(approximate="tanh"),
                                 nn.Linear(router_hidden, NUM_ACTIONS))
        for lin in (self.net[0], self.net[2]):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def window_pool(hidden: torch.Tensor, mask: torch.Tensor | None,
                max_windows: int = DEFAULT_WINDOWS) -> tuple[torch.Tensor, torch.Tensor]:
    """Window means over each row's valid tokens: (pooled (B, W_max, d), valid (B, W_max)).

    Row b with T_b tokens (mask 1; padding may be anywhere) uses W_b = min(W_max, T_b) windows
    of size s_b = floor(T_b / W_b); its j-th token (0-based among valid ones) goes to window
    floor(j / s_b) when j < W_b * s_b, else it is dropped."""
    batch, length, _ = hidden.shape
    if mask is None:
        mask = torch.ones(batch, length, dtype=torch.long, device=hidden.device)
    mask = mask.to(hidden.device).bool()
    n_tokens = mask.sum(-1)                                             # T_b
    n_windows = n_tokens.clamp(max=max_windows)                          # W_b
    size = torch.div(n_tokens, n_windows.clamp(min=1), rounding_mode="floor").clamp(min=1)  # s_b
    rank = mask.long().cumsum(-1) - 1                                    # j
    window = torch.div(rank, size[:, None], rounding_mode="floor")
    keep = mask & (rank < (n_windows * size)[:, None])
    window = torch.where(keep, window, torch.full_like(window, max_windows))  # dropped -> extra bin
    onehot = torch.nn.functional.one_hot(window, max_windows + 1)[..., :max_windows]  # (B, T, W)
    weights = onehot.transpose(1, 2).to(hidden.dtype) / size[:, None, None].to(hidden.dtype)
    pooled = torch.bmm(weights, hidden)                                  # (B, W, d)
    valid = torch.arange(max_windows, device=hidden.device)[None, :] < n_windows[:, None]
    return pooled, valid


class PathRouter(nn.Module):
    """One :class:`BlockRouter` per block, with windowed pooling and logit averaging."""

    def __init__(self, num_layers: int, hidden_size: int, router_hidden: int = DEFAULT_ROUTER_HIDDEN,
                 num_windows: int = DEFAULT_WINDOWS):
        super().__init__()
        self.num_layers, self.hidden_size = num_layers, hidden_size
        self.router_hidden, self.num_windows = router_hidden, num_windows
        self.blocks = nn.ModuleList(BlockRouter(hidden_size, router_hidden) for _ in range(num_layers))

    def layer_logits(self, layer_idx: int, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """(B, 3) logits of router l: mean over the row's valid windows of r_l(window mean)."""
        param = self.blocks[layer_idx].net[0].weight
        pooled, valid = window_pool(hidden.to(param.dtype), mask, self.num_windows)
        return self.pooled_logits(layer_idx, pooled, valid)

    def pooled_logits(self, layer_idx: int, pooled: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """(B, 3) logits of router l from window means (B, W, d) and their validity (B, W)."""
        logits = self.blocks[layer_idx](pooled.to(self.blocks[layer_idx].net[0].weight.dtype))  # (B, W, 3)
        valid = valid.to(logits.dtype)[..., None]
        return (logits * valid).sum(1) / valid.sum(1).clamp(min=1.0)

    def all_logits(self, pooled: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """(N, L, 3) logits of every router from cached window means (N, L, W, d), validity (N, L, W)."""
        return torch.stack([self.pooled_logits(layer, pooled[:, layer], valid[:, layer])
                            for layer in range(self.num_layers)], dim=1)

    def decide(self, layer_idx: int, hidden: torch.Tensor, mask: torch.Tensor | None,
               p: float = PURE_ROUTER_P) -> torch.Tensor:
        """(B,) actions: argmax of the router's probabilities blended by the p knob."""
        with torch.no_grad():
            probs = self.layer_logits(layer_idx, hidden, mask).softmax(-1)
        return knob_probs(probs, p).argmax(-1)

    def decider(self, p: float = PURE_ROUTER_P):
        """A ``decide(layer_idx, hidden, mask)`` callable for :class:`RoutedModel`."""
        return lambda layer_idx, hidden, mask: self.decide(layer_idx, hidden, mask, p)


def knob_probs(probs: torch.Tensor, p: float) -> torch.Tensor:
    """The paper's p in [-1, 1] knob as a linear blend of action distributions.

    p in [-1, -0.5]: always-skip -> router; (-0.5, 0.5]: router -> always-execute;
    (0.5, 1]: always-execute -> always-repeat. p = -0.5 is the router alone. (The appendix gives
    these segments; the linear blend of probabilities within a segment is our reading.)"""
    if not -1.0 <= p <= 1.0:
        raise ValueError(f"the p knob must lie in [-1, 1], got {p}")
    def onehot(a: int) -> torch.Tensor:
        return nn.functional.one_hot(torch.tensor(a), NUM_ACTIONS).to(probs).expand_as(probs)

    if p <= -0.5:
        t = (p + 1.0) / 0.5
        return (1 - t) * onehot(SKIP) + t * probs
    if p <= 0.5:
        t = p + 0.5
        return (1 - t) * probs + t * onehot(EXECUTE)
    t = (p - 0.5) / 0.5
    return (1 - t) * onehot(EXECUTE) + t * onehot(REPEAT)
