"""Channel importance scores of an output projection's input channels (pure tensor math).

All functions take the projection weight W: [d_out, d_in] and return a float64 score per input
channel j: [d_in]. Higher means more important.
"""

from __future__ import annotations

import torch

from .errors import FlapError
from .stats import ChannelStats


def fluctuation(metric: str, stats: ChannelStats, weight: torch.Tensor) -> torch.Tensor:
    """FLAP's metrics: IFV, WIFV (default) or WIFN."""
    w = weight.detach().to(torch.float64)
    dev = w.device
    if metric == "IFV":
        return stats.var.to(dev)
    if metric == "WIFV":
        return stats.var.to(dev) * (w * w).sum(0)
    if metric == "WIFN":
        return w.abs().mean(0) * stats.mean_sq.to(dev).sqrt()
    raise FlapError(f"unknown metric {metric!r}; choose one of: IFV, WIFV, WIFN")


def wanda_sp(stats: ChannelStats, weight: torch.Tensor) -> torch.Tensor:
    """Wanda-sp: mean_i |W_ij| * ||x_j||_2, the norm over all calibration tokens."""
    w = weight.detach().to(torch.float64)
    return w.abs().mean(0) * stats.norm.to(w.device)


def magnitude(weight: torch.Tensor) -> torch.Tensor:
    """Mag-sp: the L2 norm of column j."""
    return weight.detach().to(torch.float64).norm(dim=0)
