"""Compensation for removed input columns of an output projection (pure tensor math).

W: [d_out, d_in], kept/removed: LongTensor index sets partitioning range(d_in).
Everything is computed in float64 and returned in float64; the caller casts.
"""

from __future__ import annotations

import torch


def _bias64(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if bias is None:
        return torch.zeros(weight.shape[0], dtype=torch.float64, device=weight.device)
    return bias.detach().to(torch.float64)


def bias_compensation(
    weight: torch.Tensor, bias: torch.Tensor | None, mean: torch.Tensor, removed: torch.Tensor
) -> torch.Tensor:
    """FLAP: b_new = b_old + W[:, P] mu_P, so the mean output over the calibration data is unchanged."""
    w = weight.detach().to(torch.float64)
    removed = removed.to(w.device)
    return _bias64(w, bias) + w[:, removed] @ mean.to(w.device, torch.float64)[removed]


def lsq_compensation(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    cov: torch.Tensor,
    kept: torch.Tensor,
    removed: torch.Tensor,
    damp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares refit of the kept columns: the removed inputs are predicted from the kept ones,
    x_P ~ mu_P + A (x_K - mu_K) with A = C_PK (C_KK + lambda I)^-1, and folded into W_K and b.

    Returns (W_K' [d_out, |K|], b' [d_out]). With A = 0 this is bias compensation; the damped
    solution never increases the calibration reconstruction error over it.
    """
    w = weight.detach().to(torch.float64)
    dev = w.device
    kept, removed = kept.to(dev), removed.to(dev)
    mu = mean.to(dev, torch.float64)
    c = cov.to(dev, torch.float64)
    w_k, w_p = w[:, kept], w[:, removed]
    b = _bias64(w, bias)
    if removed.numel() == 0 or kept.numel() == 0:
        return w_k, b + w_p @ mu[removed]
    c_kk = c[kept][:, kept]
    c_kp = c[kept][:, removed]
    lam = damp * c_kk.diagonal().mean().clamp_min(1e-12)
    eye = torch.eye(kept.numel(), dtype=torch.float64, device=dev)
    a_t = torch.linalg.solve(c_kk + lam * eye, c_kp)  # A^T: [|K|, |P|]
    w_k_new = w_k + w_p @ a_t.T
    b_new = b + w_p @ (mu[removed] - a_t.T @ mu[kept])
    return w_k_new, b_new
