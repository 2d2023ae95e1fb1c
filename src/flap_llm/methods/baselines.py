"""The paper's structured baselines: Wanda-sp and magnitude (mag-sp). Uniform per layer, no compensation."""

from __future__ import annotations

import copy
import math

import torch

from ..math import metrics
from ..model.apply import LayerUpdate, OutputUpdate, apply_layer
from ..model.arch import Dims
from .base import Method
from .job import Job
from ..model.plan import LayerPlan, PrunePlan
from ..math.select import align_channels, drop_lowest, uniform
from ..calibration.walk import layer_stats, output_projections


def _group_sum(scores: torch.Tensor, dims: Dims) -> torch.Tensor:
    return scores.reshape(dims.n_kv_heads, -1).sum(1)


def prune_magnitude(job: Job, statistics=None) -> tuple[PrunePlan, None]:
    """mag-sp: the L2 norm of each input column of o_proj/down_proj; needs no data."""
    def score(i, layer):
        proj = output_projections(layer, job.spec)
        return metrics.magnitude(proj["attn"].weight), metrics.magnitude(proj["mlp"].weight)

    with job.timer("plan"):
        attn, mlp = job.scores_of_each_layer(score)
        plan = job.plan_of(job.aligned(uniform(attn, mlp, job.dims, job.config.ratio), mlp))
    with job.timer("apply"):
        job.apply(plan, None)
    return plan, None


def prune_wanda_sp(job: Job, statistics=None) -> tuple[PrunePlan, None]:
    """Wanda-sp, sequential: each layer's statistics come from the already-pruned previous layers. The walk
    prunes a copy of each layer to propagate; the model itself changes only once the plan is whole."""
    dims, cfg = job.dims, job.config
    n_groups, n_channels = math.floor(cfg.ratio * dims.n_kv_heads), math.floor(cfg.ratio * dims.d_ff)
    layer_plans: list[LayerPlan] = []

    def visit(idx, layer, inputs):
        s = layer_stats(layer, job.spec, inputs, keep=False, layer_idx=idx)
        proj = output_projections(layer, job.spec)
        groups = drop_lowest(_group_sum(metrics.wanda_sp(s.attn, proj["attn"].weight), dims), n_groups)
        mlp_scores = metrics.wanda_sp(s.mlp, proj["mlp"].weight)
        channels = drop_lowest(mlp_scores, n_channels)
        if cfg.align:
            channels = align_channels(channels, mlp_scores, cfg.align)
        lp = PrunePlan.from_groups([groups], [channels], dims).layers[0]
        layer_plans.append(lp)
        pruned = copy.deepcopy(layer)
        apply_layer(pruned, idx, job.spec, dims, lp, LayerUpdate(OutputUpdate(), OutputUpdate()), "prune")
        return pruned

    with job.timer("statistics"):
        job.walk(visit, "wanda-sp")
    plan = PrunePlan(tuple(layer_plans))
    with job.timer("apply"):
        job.apply(plan, None)
    return plan, None


class MagnitudeSP(Method):
    name = "mag-sp"
    summary = "the paper's magnitude baseline (no data)"
    needs_data = False

    def run(self, job: Job, statistics=None) -> tuple[PrunePlan, None]:
        return prune_magnitude(job, statistics)

    def uniform(self, options) -> bool:
        return True


class WandaSP(Method):
    name = "wanda-sp"
    summary = "the paper's Wanda-sp baseline"

    def run(self, job: Job, statistics=None) -> tuple[PrunePlan, None]:
        return prune_wanda_sp(job, statistics)

    def uniform(self, options) -> bool:
        return True
