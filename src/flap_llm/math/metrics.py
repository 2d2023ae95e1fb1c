"""Channel importance scores of an output projection's input channels (pure tensor math).

All functions take the projection weight W: [d_out, d_in] and return a float64 score per input
channel j: [d_in]. Higher means more important.
"""

from __future__ import annotations

import torch

from ..errors import FlapError
from .stats import ChannelStats


def ifv(stats: ChannelStats, w: torch.Tensor) -> torch.Tensor:
    """Input feature variance: Var(x_j) over the calibration tokens."""
    return stats.var.to(w.device)


def wifv(stats: ChannelStats, w: torch.Tensor) -> torch.Tensor:
    """Weighted IFV (FLAP's default): Var(x_j) * ||W_:,j||^2."""
    return stats.var.to(w.device) * (w * w).sum(0)


def wifn(stats: ChannelStats, w: torch.Tensor) -> torch.Tensor:
    """Weighted input feature norm: mean_i |W_ij| * sqrt(E[x_j^2])."""
    return w.abs().mean(0) * stats.mean_sq.to(w.device).sqrt()


# FLAP's fluctuation metrics by name (PruneConfig.metric)
FLUCTUATION_METRICS = {"IFV": ifv, "WIFV": wifv, "WIFN": wifn}


def fluctuation(metric: str, stats: ChannelStats, weight: torch.Tensor) -> torch.Tensor:
    """FLAP's metric `metric` of every input channel of an output projection with weight `weight`."""
    if metric not in FLUCTUATION_METRICS:
        raise FlapError(f"unknown metric {metric!r}; choose one of: {', '.join(FLUCTUATION_METRICS)}")
    return FLUCTUATION_METRICS[metric](stats, weight.detach().to(torch.float64))


def wanda_sp(stats: ChannelStats, weight: torch.Tensor) -> torch.Tensor:
    """Wanda-sp: mean_i |W_ij| * ||x_j||_2, the norm over all calibration tokens."""
    w = weight.detach().to(torch.float64)
    return w.abs().mean(0) * stats.norm.to(w.device)


def magnitude(weight: torch.Tensor) -> torch.Tensor:
    """Mag-sp: the L2 norm of column j."""
    return weight.detach().to(torch.float64).norm(dim=0)
