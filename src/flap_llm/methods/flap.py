"""FLAP (the paper): fluctuation statistics on the dense model, a standardized selection, and the
compensation of the removed inputs (FLAP's bias, or least squares)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..math import metrics
from ..model.apply import LayerUpdate, OutputUpdate, apply_layer, complement, head_rows, layer_shape, record_shapes
from ..model.arch import ArchSpec, Dims, decoder_layers
from ..math.compensate import bias_compensation, lsq_compensation
from ..errors import FlapError
from .base import Method, Options, check_ridge, option
from .job import Job
from ..math.metrics import FLUCTUATION_METRICS
from ..model.plan import LayerPlan, PrunePlan
from ..math.select import MANUAL_STRUCTURES, STRUCTURES, UNIFORM_STRUCTURES, select
from ..math.stats import Covariance, LayerStats
from ..calibration.walk import collect_statistics, forward_all, output_projections, record_inputs


LSQ_DAMP = 0.01  # the least-squares ridge of FLAP + lsq (as a fraction of the mean input variance)


@dataclass(frozen=True)
class FlapOptions(Options):
    """FLAP's options (the paper).

    metric: the fluctuation metric, "WIFV" (default), "IFV" or "WIFN".
    structure: how units are allotted to layers and modules: "AL-AM" (default, adaptive), "UL-UM", "UL-MM",
        "AL-MM"; the *-MM structures need `remove_heads` (KV groups to remove over all layers).
    compensation: "bias" (the paper's), "lsq" (least-squares refit of the kept columns) or "none".
    lsq_damp: with "lsq": the refit's ridge as a fraction of the mean input variance (default 0.01).
    sequential: with "lsq": take the refit's statistics from the already pruned earlier layers (default off).
    """

    metric: str = option("WIFV", choices=tuple(FLUCTUATION_METRICS), help="fluctuation metric (default WIFV)")
    structure: str = option("AL-AM", choices=tuple(STRUCTURES),
                            help="how units are allotted to layers and modules (default AL-AM, adaptive)")
    remove_heads: int | None = option(help="KV groups to remove in total (UL-MM, AL-MM)")
    compensation: str = option("bias", choices=("bias", "lsq", "none"),
                               help="bias (the paper's, default), lsq (least-squares refit of the kept columns) or none")
    lsq_damp: float | None = option(help=f"with --compensation lsq: the refit's ridge, as a fraction of the mean input "
                                         f"variance (default {LSQ_DAMP}; larger: less fitted to the calibration)")
    sequential: bool | None = option(help="with --compensation lsq: the refit's statistics from the already-pruned "
                                          "layers")

    def validate(self) -> None:
        if self.structure in MANUAL_STRUCTURES and self.remove_heads is None:
            raise FlapError(f"structure {self.structure} needs remove_heads (total KV groups to remove)")
        if self.remove_heads is not None:
            if self.structure not in MANUAL_STRUCTURES:
                raise FlapError(f"remove_heads goes with structure UL-MM or AL-MM; {self.structure} sets its own")
            if isinstance(self.remove_heads, bool) or not isinstance(self.remove_heads, int) or self.remove_heads < 0:
                raise FlapError(f"remove_heads must be a non-negative integer, got {self.remove_heads!r}")
        if self.compensation != "lsq":
            if self.lsq_damp is not None or self.sequential:
                raise FlapError(f"lsq_damp and sequential are options of compensation lsq (--compensation lsq), "
                                f"not {self.compensation}")
            object.__setattr__(self, "sequential", None)
            return
        if self.lsq_damp is None:
            object.__setattr__(self, "lsq_damp", LSQ_DAMP)
        check_ridge("lsq_damp", self.lsq_damp)
        if self.sequential is None:
            object.__setattr__(self, "sequential", False)
        if not isinstance(self.sequential, bool):
            raise FlapError(f"sequential must be True or False, got {self.sequential!r}")


def channel_scores(layer: nn.Module, spec: ArchSpec, s: LayerStats, metric: str):
    """FLAP's scores of one layer: attention channels get the metric squared (as the paper's code does)."""
    proj = output_projections(layer, spec)
    return (metrics.fluctuation(metric, s.attn, proj["attn"].weight) ** 2,
            metrics.fluctuation(metric, s.mlp, proj["mlp"].weight))


def bias_update(layer: nn.Module, spec: ArchSpec, dims: Dims, lp: LayerPlan, s: LayerStats) -> LayerUpdate:
    """FLAP's compensation of one layer: the removed inputs' mean contribution folded into the biases."""
    proj = output_projections(layer, spec)
    removed_q = complement(head_rows(lp.heads, dims.head_dim), dims.n_heads * dims.head_dim)
    removed_c = complement(lp.channels, dims.d_ff)
    return LayerUpdate(
        OutputUpdate(bias=bias_compensation(proj["attn"].weight, proj["attn"].bias, s.attn.mean, removed_q)),
        OutputUpdate(bias=bias_compensation(proj["mlp"].weight, proj["mlp"].bias, s.mlp.mean, removed_c)),
    )


def bias_updates(model: nn.Module, spec: ArchSpec, dims: Dims, plan: PrunePlan,
                 stats: list[LayerStats]) -> list[LayerUpdate]:
    """Bias compensation of every layer of an in-memory model (for plans built or loaded by hand)."""
    return [bias_update(layer, spec, dims, lp, s)
            for layer, lp, s in zip(decoder_layers(model, spec), plan.layers, stats)]


def _compensate_bias(job: Job, plan: PrunePlan, stats: list[LayerStats]) -> None:
    job.apply(plan, lambda i, layer, lp: bias_update(layer, job.spec, job.dims, lp, stats[i]))


def _compensate_none(job: Job, plan: PrunePlan, stats: list[LayerStats]) -> None:
    job.apply(plan, None)


def _lsq_update(proj: nn.Linear, cov: Covariance, kept: torch.Tensor, n: int, damp: float) -> OutputUpdate:
    removed = complement(kept, n)
    w, b = lsq_compensation(proj.weight, proj.bias, cov.mean, cov.cov, kept, removed, damp)
    return OutputUpdate(bias=b, weight=w)


def refit_walk(job: Job, choose: Callable[[int, nn.Module, dict[str, Covariance]], LayerPlan], desc: str,
               damp: float, sequential: bool) -> PrunePlan:
    """A pass that prunes each layer with the least-squares refit (ridge `damp`): per layer, the full input
    covariance of o_proj/down_proj, `choose` gives the layer's plan from it, the refit, and the layer is pruned.
    Covariances live for one layer only. With `sequential` the covariances come from the already pruned
    earlier layers; otherwise the dense outputs propagate."""
    cfg, dims, shapes, plans = job.config, job.dims, [], []

    def visit(idx, layer, inputs):
        proj = output_projections(layer, job.spec)
        sinks = {k: Covariance(m.in_features, torch.float32) for k, m in proj.items()}
        with record_inputs(proj, sinks):
            forward_all(layer, inputs, keep=not sequential)
        for sink in sinks.values():
            sink.all_reduce_()
        lp = choose(idx, layer, sinks)
        update = LayerUpdate(
            _lsq_update(proj["attn"], sinks["attn"], head_rows(lp.heads, dims.head_dim), dims.n_heads * dims.head_dim,
                        damp),
            _lsq_update(proj["mlp"], sinks["mlp"], torch.as_tensor(lp.channels, dtype=torch.long), dims.d_ff,
                        damp),
        )
        apply_layer(layer, idx, job.spec, dims, lp, update, cfg.mode)
        shapes.append(layer_shape(layer, job.spec, dims, lp, cfg.mode))
        plans.append(lp)
        job.layers.commit(idx, layer)
        return layer if sequential else None

    job.walk(visit, desc)
    record_shapes(job.model, shapes, cfg.mode)
    return PrunePlan(tuple(plans))


def _compensate_lsq(job: Job, plan: PrunePlan, stats: list[LayerStats]) -> None:
    """Second pass: the plan's layers refit by least squares (the plan is fixed; see refit_walk)."""
    plan.validate(job.dims)
    opts = job.config.options
    refit_walk(job, lambda idx, layer, covs: plan.layers[idx], "lsq compensation", opts.lsq_damp, opts.sequential)


# Compensations by name (FlapOptions.compensation): (job, plan, dense statistics) -> the model is pruned
COMPENSATIONS = {"bias": _compensate_bias, "lsq": _compensate_lsq, "none": _compensate_none}
# the timer section each compensation's pass is reported under
_SECTION = {"bias": "apply", "lsq": "compensation", "none": "apply"}


def prune_flap(job: Job, stats: list[LayerStats] | None) -> tuple[PrunePlan, list[LayerStats]]:
    """FLAP: dense statistics (one calibration pass, or reused), scores, the structure's selection, then the
    configured compensation applies the plan."""
    cfg, opts = job.config, job.config.options
    if stats is None:
        scores: list[tuple[torch.Tensor, torch.Tensor]] = []
        with job.timer("statistics"):
            stats = collect_statistics(job.model, job.spec, job.batches, job.progress, job.layers,
                                       on_layer=lambda i, layer, s: scores.append(
                                           channel_scores(layer, job.spec, s, opts.metric)))
        attn, mlp = [a for a, _ in scores], [m for _, m in scores]
    else:
        with job.timer("plan"):
            attn, mlp = job.scores_of_each_layer(lambda i, layer: channel_scores(layer, job.spec, stats[i], opts.metric))
    with job.timer("plan"):
        plan = job.plan_of(job.aligned(select(opts.structure, attn, mlp, job.dims, cfg.ratio, opts.remove_heads), mlp))
    with job.timer(_SECTION[opts.compensation]):
        COMPENSATIONS[opts.compensation](job, plan, stats)
    return plan, stats


class Flap(Method):
    name = "flap"
    summary = "the paper (default)"
    options = FlapOptions
    uses_statistics = True

    def run(self, job: Job, statistics: list[LayerStats] | None) -> tuple[PrunePlan, list[LayerStats]]:
        return prune_flap(job, statistics)

    def compensation(self, options: FlapOptions) -> str:
        return options.compensation

    def label(self, options: FlapOptions) -> str:
        lsq = ", lsq" if options.compensation == "lsq" else ""
        return f"flap, {options.structure}, {options.metric}{lsq}"

    def uniform(self, options: FlapOptions) -> bool:
        return options.structure in UNIFORM_STRUCTURES

    def cost(self, inputs, options: FlapOptions):
        from ..reporting.estimate import Cost
        if options.compensation != "lsq":
            return Cost()
        s = inputs.shapes  # the refit pass: one layer's float64 covariances and their solves at a time
        attn = s.n_heads * s.head_dim
        return Cost(parts={"refit: one layer's covariances and solves": 3 * 8 * (s.d_ff ** 2 + attn * attn)},
                    forward=2)
