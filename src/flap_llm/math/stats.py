"""Mergeable per-channel activation statistics, accumulated in float64.

Sums (n, sum x, sum x^2) are exact to float64 rounding whatever the batch size or window split,
and merge across processes with a plain all-reduce of sums.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ChannelStats:
    """Statistics of the d input channels of one projection over all calibration tokens."""

    dim: int
    n: int = 0
    sum: torch.Tensor = field(default=None)  # [d] float64
    sumsq: torch.Tensor = field(default=None)  # [d] float64

    def __post_init__(self) -> None:
        if self.sum is None:
            self.sum = torch.zeros(self.dim, dtype=torch.float64)
        if self.sumsq is None:
            self.sumsq = torch.zeros(self.dim, dtype=torch.float64)

    def update(self, x: torch.Tensor) -> None:
        # x: [..., d] in any dtype; every leading position is one token
        x = x.detach().reshape(-1, self.dim).to(torch.float64)
        if self.sum.device != x.device:
            self.sum, self.sumsq = self.sum.to(x.device), self.sumsq.to(x.device)
        self.n += x.shape[0]
        self.sum += x.sum(0)
        self.sumsq += (x * x).sum(0)

    def merge(self, other: "ChannelStats") -> None:
        self.n += other.n
        self.sum += other.sum.to(self.sum.device)
        self.sumsq += other.sumsq.to(self.sumsq.device)

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(self.n, 1)

    @property
    def mean_sq(self) -> torch.Tensor:
        return self.sumsq / max(self.n, 1)

    @property
    def var(self) -> torch.Tensor:
        """Population variance."""
        return (self.mean_sq - self.mean**2).clamp_min(0.0)

    @property
    def norm(self) -> torch.Tensor:
        """The L2 norm of each channel over all tokens, ||x_j||_2."""
        return self.sumsq.sqrt()

    def all_reduce_(self) -> None:
        """Sum over all ranks of a torch.distributed group (no-op in one process)."""
        from ..calibration.distributed import all_reduce_sum_, reduce_count
        self.n = reduce_count(self.n, self.sum)
        all_reduce_sum_(self.sum, self.sumsq)

    def is_finite(self) -> bool:
        return bool(torch.isfinite(self.sum).all() and torch.isfinite(self.sumsq).all())


@dataclass
class LayerStats:
    """Input statistics of one decoder layer's two output projections."""

    attn: ChannelStats  # inputs of o_proj: [n_heads * head_dim]
    mlp: ChannelStats  # inputs of down_proj: [d_ff]

    def merge(self, other: "LayerStats") -> None:
        self.attn.merge(other.attn)
        self.mlp.merge(other.mlp)


@dataclass
class Covariance:
    """Mergeable first and second moments (with cross terms) of d channels, accumulated in float64.

    Each batch's x^T x is computed in `compute_dtype` (float32 is several times faster than float64 on
    CPUs, with relative error ~1e-6 per batch, harmless under the damped solve) and summed in float64.
    """

    dim: int
    compute_dtype: torch.dtype = torch.float64
    n: int = 0
    sum: torch.Tensor = field(default=None)  # [d]
    outer: torch.Tensor = field(default=None)  # [d, d], sum of x x^T

    def __post_init__(self) -> None:
        if self.sum is None:
            self.sum = torch.zeros(self.dim, dtype=torch.float64)
        if self.outer is None:
            self.outer = torch.zeros(self.dim, self.dim, dtype=torch.float64)

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, self.dim)
        if self.sum.device != x.device:
            self.sum, self.outer = self.sum.to(x.device), self.outer.to(x.device)
        self.n += x.shape[0]
        self.sum += x.to(torch.float64).sum(0)
        xc = x.to(self.compute_dtype)
        self.outer += (xc.T @ xc).to(torch.float64)

    def all_reduce_(self) -> None:
        from ..calibration.distributed import all_reduce_sum_, reduce_count
        self.n = reduce_count(self.n, self.sum)
        all_reduce_sum_(self.sum, self.outer)

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(self.n, 1)

    @property
    def cov(self) -> torch.Tensor:
        """Population covariance C = E[x x^T] - mu mu^T."""
        mu = self.mean
        return (self.outer / max(self.n, 1)).addr_(mu, mu, alpha=-1)  # in place: no [d, d] temporary


class SplitCovariance:
    """The calibration windows' inputs in two halves, for refits fitted on one half and scored on the other:
    window g of the whole calibration set (over every process) goes to half g % 2, whatever the batching or
    the number of processes (each process records its own windows; the halves are summed over them).
    `merged` is the Covariance of all of them.

    Updates see this process's windows in order, a batch at a time; `rows`: when a forward holds only some
    of them (the Fisher pass runs a batch's windows in two groups), their positions in this process's
    sequence of windows [n]. None: the next windows in order."""

    def __init__(self, dim: int, compute_dtype: torch.dtype = torch.float64) -> None:
        self.dim = dim
        self.halves = (Covariance(dim, compute_dtype), Covariance(dim, compute_dtype))
        self.seen = 0  # windows of this process recorded in order so far
        self.rows: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        from ..calibration.distributed import rank, world_size
        x = x.detach()
        x = x.reshape(-1, 1, self.dim) if x.dim() < 3 else x.reshape(x.shape[0], -1, self.dim)  # [windows, L, d]
        if self.rows is None:
            local = torch.arange(self.seen, self.seen + x.shape[0])
            self.seen += x.shape[0]
        else:
            local = self.rows
        if local.numel() != x.shape[0]:
            raise ValueError(f"{local.numel()} row positions for {x.shape[0]} windows")
        first = ((rank() + world_size() * local) % 2 == 0).to(x.device)  # shard() gives rank r windows r::world
        self.halves[0].update(x[first])
        self.halves[1].update(x[~first])

    def all_reduce_(self) -> None:
        for half in self.halves:
            half.all_reduce_()

    def merged(self) -> Covariance:
        a, b = self.halves
        return Covariance(self.dim, a.compute_dtype, a.n + b.n, a.sum + b.sum, a.outer + b.outer)
