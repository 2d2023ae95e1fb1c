"""obs: choose what to remove by what the least-squares refit can rebuild (structured OBS), and split the
budget over layers and modules by the measured error, not by standardized scores.

Two passes, like FLAP + lsq:
1. On the dense model, each layer's o_proj/down_proj input covariances give FLAP's statistics and, for the
   measured allocation, each module's removal path (`reconstruct.removal_path`: greedy structured OBS, with
   its refit error after every prefix). The errors, relative to the energy of the residual stream entering
   the layer (what every later layer reads, normalized), are split under the budget by `reconstruct.allocate`.
2. The refit pass (`flap.refit_walk`): per layer the units chosen (greedy OBS again on this pass's
   covariances, which with `sequential` come from the already pruned layers; or FLAP's metric order for the
   ablation), the least-squares refit of the kept columns, and the layer is pruned.

Options (PruneConfig): selection "obs" | "metric", allocation "measured" | "structure" (FLAP's `structure`
on FLAP's scores), sequential. selection="metric" with allocation="structure" is FLAP + lsq.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import distributed
from ..arch import Dims
from ..errors import FlapError
from ..plan import LayerPlan, PrunePlan
from ..reconstruct import RemovalPath, allocate, damped, removal_path
from ..select import select, total_weight
from ..stats import ChannelStats, Covariance, LayerStats
from ..walk import forward_all, output_projections, record_inputs
from .flap import channel_scores, refit_walk
from .job import Job

# the largest share of one layer's MLP channels the measured allocation may remove (its paths stop there)
MAX_MLP_REMOVED = 0.9
# MLP channels taken per greedy OBS step: 1/STEPS of the layer's width (heads go one KV group at a time)
STEPS = 128


def _stats_of(cov: Covariance) -> ChannelStats:
    """FLAP's per-channel statistics read off a covariance's moments."""
    return ChannelStats(cov.dim, cov.n, cov.sum.clone(), cov.outer.diagonal().clone())


def _residual_energy(inputs) -> float:
    """Mean squared norm of the residual stream over the calibration tokens (all ranks)."""
    acc = torch.zeros(2, dtype=torch.float64)
    for hidden, _ in inputs:
        acc[0] += hidden.detach().to(torch.float64).pow(2).sum().cpu()
        acc[1] += hidden.shape[0] * hidden.shape[1]
    distributed.all_reduce_sum_(acc)
    return float(acc[0] / acc[1])


def _metric_order(scores: torch.Tensor) -> torch.Tensor:
    return torch.sort(scores.cpu(), stable=True).indices


def _paths(layer: nn.Module, job: Job, covs: dict[str, Covariance], counts: tuple[int, int],
           orders: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[RemovalPath, RemovalPath]:
    """Removal paths of one layer's o_proj (KV groups) and down_proj (channels), to the given counts."""
    dims, damp = job.dims, job.config.lsq_damp
    proj = output_projections(layer, job.spec)
    attn = removal_path(proj["attn"].weight, damped(covs["attn"].cov, damp), dims.group_size * dims.head_dim,
                        counts[0], 1, None if orders is None else orders[0])
    mlp = removal_path(proj["mlp"].weight, damped(covs["mlp"].cov, damp), 1, counts[1],
                       max(1, dims.d_ff // STEPS), None if orders is None else orders[1])
    return attn, mlp


def _layer_plan(dims: Dims, removed_groups: torch.Tensor, removed_channels: torch.Tensor) -> LayerPlan:
    groups = sorted(set(range(dims.n_kv_heads)) - {int(u) for u in removed_groups})
    channels = sorted(set(range(dims.d_ff)) - {int(u) for u in removed_channels})
    return PrunePlan.from_groups([torch.tensor(groups, dtype=torch.long)], [torch.tensor(channels, dtype=torch.long)],
                                 dims).layers[0]


def _aligned(n_removed: int, d_ff: int, multiple: int | None) -> int:
    """Channels removed once the kept count is rounded to the nearest multiple (halves round up)."""
    if not multiple:
        return n_removed
    kept = min(d_ff, multiple * math.floor((d_ff - n_removed) / multiple + 0.5))
    return d_ff - kept


def prune_obs(job: Job, statistics=None) -> tuple[PrunePlan, list[LayerStats]]:
    cfg, dims = job.config, job.dims
    measured = cfg.allocation == "measured"
    mlp_cap = min(dims.d_ff, math.floor(MAX_MLP_REMOVED * dims.d_ff))
    stats: list[LayerStats] = []
    scores: list[tuple[torch.Tensor, torch.Tensor]] = []
    dense_paths: list[tuple[RemovalPath, RemovalPath]] = []
    energy: list[float] = []

    def order_of(i: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """FLAP's removal order of layer i (lowest score first), for selection="metric"."""
        if cfg.selection != "metric":
            return None
        attn, mlp = scores[i]
        return _metric_order(attn.reshape(dims.n_kv_heads, -1).sum(1)), _metric_order(mlp)

    def survey(idx, layer, inputs):
        energy.append(_residual_energy(inputs))
        proj = output_projections(layer, job.spec)
        covs = {k: Covariance(m.in_features, torch.float32) for k, m in proj.items()}
        with record_inputs(proj, covs):
            forward_all(layer, inputs, keep=True)
        for c in covs.values():
            c.all_reduce_()
        stats.append(LayerStats(_stats_of(covs["attn"]), _stats_of(covs["mlp"])))
        scores.append(channel_scores(layer, job.spec, stats[-1], cfg.metric))
        if measured:
            dense_paths.append(_paths(layer, job, covs, (dims.n_kv_heads, mlp_cap), order_of(idx)))
        return None

    with job.timer("statistics"):
        job.walk(survey, "obs: covariances and removal paths" if measured else "obs: statistics")

    with job.timer("plan"):
        if measured:
            curves, costs = [], []
            for (attn, mlp), e in zip(dense_paths, energy):
                curves += [attn.error / e, mlp.error / e]
                costs += [dims.group_weight, 1.0]
            budget = cfg.ratio * total_weight(dims)
            counts = allocate(curves, costs, budget)
            if sum(k * c for k, c in zip(counts, costs)) < budget - 1:
                raise FlapError(f"ratio {cfg.ratio} needs more than the measured allocation may take (every head and "
                                f"{MAX_MLP_REMOVED:.0%} of each layer's MLP channels); use a lower ratio or "
                                "allocation='structure'")
            counts = [(counts[2 * i], counts[2 * i + 1]) for i in range(dims.n_layers)]
        else:
            sel = select(cfg.structure, [a for a, _ in scores], [m for _, m in scores], dims, cfg.ratio,
                         cfg.remove_heads)
            counts = [(dims.n_kv_heads - g.numel(), dims.d_ff - c.numel())
                      for g, c in zip(sel.kept_groups, sel.kept_channels)]
        counts = [(g, _aligned(c, dims.d_ff, cfg.align)) for g, c in counts]

    def choose(idx, layer, covs):
        g, c = counts[idx]
        if cfg.selection == "metric":
            attn_order, mlp_order = order_of(idx)
            return _layer_plan(dims, attn_order[:g], mlp_order[:c])
        if measured and not cfg.sequential and c <= dense_paths[idx][1].order.numel():
            return _layer_plan(dims, dense_paths[idx][0].order[:g], dense_paths[idx][1].order[:c])
        attn, mlp = _paths(layer, job, covs, (g, c), None)  # greedy OBS on this pass's covariances
        return _layer_plan(dims, attn.order, mlp.order)

    with job.timer("compensation"):
        plan = refit_walk(job, choose, "obs: selection and refit")
    return plan, stats
