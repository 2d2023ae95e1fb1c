"""obs: choose what to remove by what the least-squares refit can rebuild (structured OBS), and split the
budget over layers and modules by the measured error, not by standardized scores.

Two passes, like FLAP + lsq:
0. One forward and backward pass of the whole model (over `fisher_fraction` of the windows, half by default;
   the others only run through the decoder) gives the Fisher information F of the next-token
   distribution with respect to every o_proj/down_proj output (`fisher.py`): an output error e costs about
   1/2 e^T F e of KL divergence, so errors weighted by F^(1/2) are comparable across layers and modules.
   Its forward also records the dense input covariances of step 1 when all layers' fit in
   `fused_budget` (else step 1 walks the layers for them, one at a time).
1. On the dense model, each layer's o_proj/down_proj input covariances give FLAP's statistics and, for the
   measured allocation, each module's removal path (`reconstruct.removal_path`: greedy structured OBS on the
   Fisher-weighted output error, with its refit error after every prefix), split under the budget by
   `reconstruct.allocate`. (The refit itself is the plain least squares: weighting the outputs by any
   invertible matrix leaves its solution unchanged.) With allocation "held-out" the curves are held-out
   errors instead: the windows are split in two halves, each module's path is fitted on one half and every
   prefix's refit scored on the other, both ways round, and the two curves averaged (the calibration fit
   error flatters wide projections, which fit their own windows' noise).
2. The refit pass (`flap.refit_walk`): per layer the units chosen (greedy OBS again on this pass's
   covariances, which with `sequential` come from the already pruned layers; or FLAP's metric order for the
   ablation), the least-squares refit of the kept columns (float64), and the layer is pruned.
The greedy paths work in float32 (both the folds' and the refit pass's); the measured allocation's in float64.

The refit pass's greedy chooses with its own ridge (`select_damp`, 0.01 by default, a tenth of the refit's
default): the refit and the allocation's curves keep `lsq_damp`, so only which units go differs, not how many.

Options (PruneConfig): selection "obs" | "metric", allocation "held-out" (default) | "measured" | "structure" (FLAP's
`structure` on FLAP's scores), sequential (on by default for obs), fisher_fraction, select_damp. selection="metric" with allocation="structure" and sequential=False is FLAP + lsq.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import distributed
from ..arch import Dims
from ..errors import FlapError
from ..fisher import output_fisher, weighting
from ..plan import LayerPlan, PrunePlan
from ..reconstruct import RemovalPath, allocate, damped, held_out_moment, removal_path
from ..select import aligned_count, select, total_weight
from ..stats import ChannelStats, Covariance, LayerStats, SplitCovariance
from ..walk import InMemoryLayers, forward_all, output_projections, record_inputs
from .flap import channel_scores, refit_walk
from .job import Job

# the largest share of one layer's MLP channels the measured allocation may remove (its paths stop there)
MAX_MLP_REMOVED = 0.9
# the Fisher weighting's ridge, as a fraction of the Fisher matrix's mean eigenvalue
FISHER_RIDGE = 0.01
# the dense covariances are recorded during the Fisher pass (saving a forward pass of their own) when all
# layers' together take at most this many bytes, and at most this share of the memory available on the model's
# device (`fused_budget`); otherwise they come from a layer walk, one layer at a time
FUSED_COVARIANCE_BYTES = 8 * 2**30
FUSED_COVARIANCE_SHARE = 0.6
# MLP channels taken per greedy OBS step: 1/STEPS of the layer's width (heads go one KV group at a time)
STEPS = 128


def covariance_bytes(dims: Dims) -> int:
    """Bytes of the float64 input covariances of every layer's o_proj and down_proj."""
    return 8 * dims.n_layers * ((dims.n_heads * dims.head_dim) ** 2 + dims.d_ff ** 2)


def available_bytes(device: torch.device) -> int | None:
    """Memory available for new tensors on `device`: free CUDA memory, or Linux's MemAvailable for the CPU;
    None where it cannot be read."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def fused_budget(device: torch.device) -> int:
    """Bytes the Fisher pass may spend on recording every layer's dense covariances."""
    free = available_bytes(device)
    return FUSED_COVARIANCE_BYTES if free is None else min(FUSED_COVARIANCE_BYTES, int(FUSED_COVARIANCE_SHARE * free))


def _covariances(proj: dict[str, nn.Linear], split: bool = False) -> dict[str, Covariance | SplitCovariance]:
    """Empty input covariances of a layer's output projections (float32 products, float64 sums); `split`: in
    two halves of the windows."""
    kind = SplitCovariance if split else Covariance
    return {k: kind(m.in_features, torch.float32) for k, m in proj.items()}


def _stats_of(cov: Covariance) -> ChannelStats:
    """FLAP's per-channel statistics read off a covariance's moments."""
    return ChannelStats(cov.dim, cov.n, cov.sum.clone(), cov.outer.diagonal().clone())


def _metric_order(scores: torch.Tensor) -> torch.Tensor:
    return torch.sort(scores.cpu(), stable=True).indices


def _paths(layer: nn.Module, job: Job, covs: dict[str, Covariance], counts: tuple[int, int],
           orders: tuple[torch.Tensor, torch.Tensor] | None, weights: dict[str, torch.Tensor] | None,
           held_out: dict[str, Covariance] | None = None, dtype: torch.dtype = torch.float64,
           damp: float | None = None) -> tuple[RemovalPath, RemovalPath]:
    """Removal paths of one layer's o_proj (KV groups) and down_proj (channels), to the given counts, on the
    Fisher-weighted output error (`weights`: F^(1/2) per projection; None: the plain output error); with
    `held_out` covariances, every prefix's refit is also scored on those inputs. `dtype`: the paths' working
    precision (`removal_path`); `damp`: the paths' ridge (None: `lsq_damp`)."""
    dims = job.dims
    damp = job.config.lsq_damp if damp is None else damp
    proj = output_projections(layer, job.spec)

    def w(name):
        weight = proj[name].weight.detach().to(torch.float64)
        return weight if weights is None else weights[name].to(weight.device) @ weight

    def v(name):
        return None if held_out is None else held_out_moment(held_out[name].cov, held_out[name].mean, covs[name].mean)

    attn = removal_path(w("attn"), damped(covs["attn"].cov, damp), dims.group_size * dims.head_dim,
                        counts[0], 1, None if orders is None else orders[0], v("attn"), dtype)
    mlp = removal_path(w("mlp"), damped(covs["mlp"].cov, damp), 1, counts[1],
                       max(1, dims.d_ff // STEPS), None if orders is None else orders[1], v("mlp"), dtype)
    return attn, mlp


def _held_out_curves(layer: nn.Module, job: Job, halves: dict[str, tuple[Covariance, Covariance]],
                     counts: tuple[int, int], orders: tuple[torch.Tensor, torch.Tensor] | None,
                     weights: dict[str, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """o_proj's and down_proj's error curves as the mean of two held-out curves: paths fitted on one half of
    the windows, scored on the other, and the other way round. These paths only estimate curves (the units are
    chosen again in the refit pass), so they work in float32: the same units and curves as float64 to 1e-5
    (tested), faster on wide MLPs (BENCHMARKS.md, the held-out timing rows)."""
    folds = [_paths(layer, job, {k: h[a] for k, h in halves.items()}, counts, orders, weights,
                    {k: h[1 - a] for k, h in halves.items()}, torch.float32) for a in (0, 1)]
    return tuple((f0.held_out + f1.held_out) / 2 for f0, f1 in zip(*folds))


def _layer_plan(dims: Dims, removed_groups: torch.Tensor, removed_channels: torch.Tensor) -> LayerPlan:
    groups = sorted(set(range(dims.n_kv_heads)) - {int(u) for u in removed_groups})
    channels = sorted(set(range(dims.d_ff)) - {int(u) for u in removed_channels})
    return PrunePlan.from_groups([torch.tensor(groups, dtype=torch.long)], [torch.tensor(channels, dtype=torch.long)],
                                 dims).layers[0]


def _aligned(n_removed: int, d_ff: int, multiple: int | None) -> int:
    """Channels removed once the kept count is rounded to the nearest multiple (halves round up)."""
    if not multiple:
        return n_removed
    return d_ff - aligned_count(d_ff - n_removed, d_ff, multiple)


def prune_obs(job: Job, statistics=None) -> tuple[PrunePlan, list[LayerStats]]:
    cfg, dims = job.config, job.dims
    measured = cfg.allocation in ("measured", "held-out")
    split = cfg.allocation == "held-out"
    mlp_cap = min(dims.d_ff, math.floor(MAX_MLP_REMOVED * dims.d_ff))
    stats: list[LayerStats] = []
    scores: list[tuple[torch.Tensor, torch.Tensor]] = []
    curves: list[tuple[torch.Tensor, torch.Tensor]] = []  # each layer's o_proj and down_proj error curves
    dense_paths: list[tuple[RemovalPath, RemovalPath]] = []  # allocation "measured": the curves' paths
    weights: list[dict[str, torch.Tensor]] | None = None
    recorded: list[dict[str, Covariance]] | None = None  # the dense covariances, from the Fisher pass
    if cfg.needs_backward:
        if not isinstance(job.layers, InMemoryLayers):
            raise FlapError("method obs weighs errors by a backward pass of the whole model, which needs it in memory; "
                            "without --offload, or with selection='metric' and allocation='structure'")
        embed = job.model.get_input_embeddings().weight
        if covariance_bytes(dims) * (2 if split else 1) <= distributed.reduce_min(fused_budget(embed.device), embed):
            recorded = [_covariances(output_projections(layer, job.spec), split) for layer in job.layers.modules]
        with job.timer("sensitivity"):
            fisher = output_fisher(job.model, job.spec, job.batches, progress=job.progress, inputs=recorded,
                                   fraction=cfg.fisher_fraction)
            weights = [{k: weighting(f, FISHER_RIDGE) for k, f in layer.items()} for layer in fisher]

    def order_of(i: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """FLAP's removal order of layer i (lowest score first), for selection="metric"."""
        if cfg.selection != "metric":
            return None
        attn, mlp = scores[i]
        return _metric_order(attn.reshape(dims.n_kv_heads, -1).sum(1)), _metric_order(mlp)

    def survey(idx, layer, covs):
        """FLAP's statistics and scores of one layer, and its dense error curves, from its covariances."""
        for c in covs.values():
            c.all_reduce_()
        halves = {k: c.halves for k, c in covs.items()} if split else None
        if split:
            covs = {k: c.merged() for k, c in covs.items()}
        stats.append(LayerStats(_stats_of(covs["attn"]), _stats_of(covs["mlp"])))
        scores.append(channel_scores(layer, job.spec, stats[-1], cfg.metric))
        counts = (dims.n_kv_heads, mlp_cap)
        if split:
            curves.append(_held_out_curves(layer, job, halves, counts, order_of(idx), weights[idx]))
        elif measured:
            dense_paths.append(_paths(layer, job, covs, counts, order_of(idx), weights[idx]))
            curves.append((dense_paths[-1][0].error, dense_paths[-1][1].error))

    def walked(idx, layer, inputs):
        proj = output_projections(layer, job.spec)
        covs = _covariances(proj, split)
        with record_inputs(proj, covs):
            forward_all(layer, inputs, keep=True)
        survey(idx, layer, covs)
        return None

    with job.timer("statistics"):
        if recorded is None:
            job.walk(walked, "obs: covariances and removal paths" if measured else "obs: statistics")
        else:
            for idx in tqdm(range(len(job.layers)), desc="obs: removal paths" if measured else "obs: statistics",
                            disable=not job.progress, unit="layer"):
                survey(idx, job.layers.modules[idx], recorded[idx])
                recorded[idx] = None  # each layer's covariances are freed once read

    with job.timer("plan"):
        if measured:  # each layer's (KV groups, MLP channels) removed: the curves' cheapest split of the budget
            budget = cfg.ratio * total_weight(dims)
            costs = [dims.group_weight, 1.0] * dims.n_layers
            flat = allocate([c for pair in curves for c in pair], costs, budget)
            if sum(k * c for k, c in zip(flat, costs)) < budget - 1:
                raise FlapError(f"ratio {cfg.ratio} needs more than the measured allocation may take (every head "
                                f"and {MAX_MLP_REMOVED:.0%} of each layer's MLP channels); use a lower ratio or "
                                "allocation='structure'")
            counts = [(flat[2 * i], flat[2 * i + 1]) for i in range(dims.n_layers)]
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
        reuse = dense_paths and cfg.select_damp == cfg.lsq_damp  # the dense paths' ridge is lsq_damp
        if reuse and not cfg.sequential and c <= dense_paths[idx][1].order.numel():
            return _layer_plan(dims, dense_paths[idx][0].order[:g], dense_paths[idx][1].order[:c])
        # greedy OBS on this pass's covariances, in float32 like the folds: on Qwen2.5-0.5B's MLPs the same
        # channels as float64 in 23 of 24 layers and counts tried, one swapped near-tie (5e-6 apart) in the other
        attn, mlp = _paths(layer, job, covs, (g, c), None, weights[idx], dtype=torch.float32, damp=cfg.select_damp)
        return _layer_plan(dims, attn.order, mlp.order)

    with job.timer("compensation"):
        plan = refit_walk(job, choose, "obs: selection and refit")
    return plan, stats
