"""Per-token KL estimators between the policy and the reference policy.

With delta = logp - ref_logp (log pi - log pi_ref), evaluated on tokens sampled from pi:
k1 = delta (unbiased, high variance), k2 = delta^2 / 2, k3 = exp(-delta) - 1 + delta (unbiased,
non-negative, low variance). Source: Schulman, "Approximating KL divergence" (2020); names and the
k3 clamp follow verl core_algos kl_penalty.
"""

from __future__ import annotations

import torch

__all__ = ["kl_estimate", "KL_KINDS"]

# canonical name for every accepted spelling
_ALIASES = {
    "k1": "k1",
    "kl": "k1",
    "k2": "k2",
    "mse": "k2",
    "k3": "k3",
    "low_var_kl": "k3",
}
KL_KINDS: tuple[str, ...] = tuple(_ALIASES)

_K3_EXP_CLAMP = 20.0  # keeps exp() finite in float32 before the final clamp
_K3_CLAMP = 10.0  # verl clamps low_var_kl to [-10, 10]


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token KL estimate, same shape as ``logp``; differentiable w.r.t. ``logp``.

    k1 ("kl"): logp - ref_logp.  k2 ("mse"): 0.5 * (logp - ref_logp)^2.
    k3 ("low_var_kl"): exp(ref_logp - logp) - 1 - (ref_logp - logp), with the log-ratio clamped to
    [-20, 20] before exp and the result clamped to [-10, 10] (verl kl_penalty convention; the
    gradient is zero where a clamp is active).
    """
    canon = _ALIASES.get(kind.lower() if isinstance(kind, str) else kind)
    if canon is None:
        raise ValueError(f"unknown KL estimator {kind!r}; valid kinds: {', '.join(KL_KINDS)}")
    delta = logp - ref_logp
    if canon == "k1":
        return delta
    if canon == "k2":
        return 0.5 * delta.square()
    neg = torch.clamp(-delta, min=-_K3_EXP_CLAMP, max=_K3_EXP_CLAMP)  # log(pi_ref / pi)
    k3 = torch.exp(neg) - 1.0 - neg
    return torch.clamp(k3, min=-_K3_CLAMP, max=_K3_CLAMP)
