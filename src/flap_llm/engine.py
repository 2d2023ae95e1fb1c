"""The one verb: prune(model, calibration, config) -> PruneResult, in place.

Every pass touches the decoder layers through a layer provider (`InMemoryLayers`, or the offloaded one
that streams layers from disk), so the same code prunes a model in memory or one larger than memory.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from . import distributed, metrics
from .apply import LayerUpdate, OutputUpdate, apply_layer, complement, head_rows, layer_shape, record_shapes
from .arch import (ArchSpec, Dims, architecture_of, check_dense, decoder_weight_params, dims_of, model_params,
                   spec_of)
from .compensate import bias_compensation, lsq_compensation
from .config import PruneConfig
from .errors import FlapError
from .plan import LayerPlan, PrunePlan
from .report import Timer, layer_report, param_report, versions
from .select import Selection, align_channels, drop_lowest, select, uniform
from .stats import Covariance, LayerStats
from .walk import (InMemoryLayers, as_batches, collect_statistics, forward_all, layer_stats, output_projections,
                   record_inputs, walk)


@dataclass
class PruneResult:
    plan: PrunePlan
    config: PruneConfig
    report: dict = field(default_factory=dict)
    stats: list[LayerStats] | None = None  # dense calibration statistics (flap only)


@dataclass
class _Job:
    """What every pass of one pruning run shares."""

    model: nn.Module
    spec: ArchSpec
    dims: Dims
    batches: list[torch.Tensor] | None
    config: PruneConfig
    timer: Timer
    progress: bool
    layers: InMemoryLayers

    def walk(self, visit, desc: str) -> None:
        walk(self.model, self.spec, self.batches, visit, self.progress, desc, self.layers)


def prune(model: nn.Module, calibration: torch.Tensor | Iterable[torch.Tensor] | None,
          config: PruneConfig = PruneConfig(), *, batch_size: int = 8, progress: bool = False,
          statistics: list[LayerStats] | None = None, layers: InMemoryLayers | None = None) -> PruneResult:
    """Prune a Hugging Face causal LM in place and return the plan and a report.

    calibration: token ids, a LongTensor [N, L] or an iterable of [B, L] batches (mag-sp needs none).
    statistics: FLAP's dense statistics from an earlier result (`result.stats`) of the same model and
        calibration, to try several ratios, metrics or structures without another calibration pass.
    layers: a layer provider; the default works on the model in memory (see offload.py for the other).
    Everything is validated before the first weight changes.
    """
    timer = Timer()
    spec, dims = check_model(model, config)
    batches, n_windows = None, 0
    if calibration is not None or config.needs_data:
        if calibration is None:
            raise FlapError(f"method {config.method} needs calibration token ids")
        batches = as_batches(calibration, batch_size, model.config.vocab_size)
        n_windows = sum(b.shape[0] for b in batches)
        if distributed.active():  # each rank takes its share of the windows; statistics are all-reduced
            batches = list(distributed.shard(torch.cat(batches)).split(batch_size))
    if statistics is not None and (not isinstance(statistics, list)
                                   or not all(isinstance(s, LayerStats) for s in statistics)):
        raise FlapError("statistics must be the `stats` of an earlier PruneResult (a list of LayerStats)")
    if statistics is not None and (len(statistics) != dims.n_layers or statistics[0].mlp.dim != dims.d_ff):
        raise FlapError("statistics do not match this model; pass the `stats` of a result for the same dense model")
    decoder_before, model_before = decoder_weight_params(model, spec), model_params(model)
    job = _Job(model, spec, dims, batches, config, timer, progress,
               layers if layers is not None else InMemoryLayers(model, spec))
    was_training = model.training
    model.eval()
    stats = None
    try:
        with torch.no_grad():
            if config.method == "flap":
                plan, stats = _prune_flap(job, statistics)
            elif config.method == "mag-sp":
                plan = _prune_magnitude(job)
            else:
                plan = _prune_wanda_sp(job)
    finally:
        model.train(was_training)
    report = {
        "architecture": architecture_of(model),
        "config": config.to_dict(),
        "compensation": config.effective_compensation,
        "dense_shape": {"num_hidden_layers": dims.n_layers, "num_attention_heads": dims.n_heads,
                        "num_key_value_heads": dims.n_kv_heads, "head_dim": dims.head_dim,
                        "hidden_size": dims.hidden, "intermediate_size": dims.d_ff},
        "params": param_report(model, spec, dims, plan, decoder_before, model_before, config.mode),
        "layers": layer_report(plan, dims),
        "calibration": None if batches is None else {
            "windows": n_windows, "seqlen": batches[0].shape[1], "tokens": n_windows * batches[0].shape[1],
            "batch_size": batch_size, "world_size": distributed.world_size()},
        "timings_s": {**timer.sections, "total": sum(timer.sections.values())},
        "versions": versions(),
    }
    return PruneResult(plan=plan, config=config, report=report, stats=stats)


def check_model(model: nn.Module, config: PruneConfig) -> tuple[ArchSpec, Dims]:
    """Everything about the model and config that can be refused before any pass (or any evaluation) runs."""
    if not isinstance(config, PruneConfig):
        raise FlapError("config must be a flap_llm.PruneConfig")
    spec = spec_of(model)
    dims = dims_of(model)
    check_dense(model, spec, dims)
    max_groups = dims.n_layers * dims.n_kv_heads
    if config.remove_heads is not None and config.remove_heads > max_groups:
        raise FlapError(f"remove_heads={config.remove_heads} but the model has only {max_groups} KV groups "
                        f"({dims.n_layers} layers x {dims.n_kv_heads})")
    if config.align is not None and config.align > dims.d_ff:
        raise FlapError(f"align={config.align} is larger than the model's MLP width {dims.d_ff}: every channel would "
                        "go; use a multiple such as 32, 64 or 128")
    return spec, dims


def _flap_channel_scores(layer: nn.Module, spec: ArchSpec, s: LayerStats, metric: str):
    """FLAP's scores of one layer: attention channels get the metric squared (as the paper's code does)."""
    proj = output_projections(layer, spec)
    return (metrics.fluctuation(metric, s.attn, proj["attn"].weight) ** 2,
            metrics.fluctuation(metric, s.mlp, proj["mlp"].weight))


def _scores_of_each_layer(job: _Job, score: Callable[[int, nn.Module], tuple[torch.Tensor, torch.Tensor]]):
    attn, mlp = [], []
    for i in range(len(job.layers)):
        with job.layers.open(i) as layer:
            a, m = score(i, layer)
        attn.append(a)
        mlp.append(m)
    return attn, mlp


def _aligned(sel: Selection, mlp_scores: list[torch.Tensor], config: PruneConfig) -> Selection:
    if not config.align:
        return sel
    return Selection(sel.kept_groups, [align_channels(k, s, config.align) for k, s in zip(sel.kept_channels, mlp_scores)])


def _prune_flap(job: _Job, stats: list[LayerStats] | None):
    cfg = job.config
    if stats is None:
        scores: list[tuple[torch.Tensor, torch.Tensor]] = []
        with job.timer("statistics"):
            stats = collect_statistics(job.model, job.spec, job.batches, job.progress, job.layers,
                                       on_layer=lambda i, layer, s: scores.append(
                                           _flap_channel_scores(layer, job.spec, s, cfg.metric)))
        attn, mlp = [a for a, _ in scores], [m for _, m in scores]
    else:
        with job.timer("plan"):
            attn, mlp = _scores_of_each_layer(job, lambda i, layer: _flap_channel_scores(layer, job.spec, stats[i],
                                                                                          cfg.metric))
    with job.timer("plan"):
        sel = _aligned(select(cfg.structure, attn, mlp, job.dims, cfg.ratio, cfg.remove_heads), mlp, cfg)
        plan = PrunePlan.from_groups(sel.kept_groups, sel.kept_channels, job.dims)
    if cfg.compensation == "lsq":
        with job.timer("compensation"):
            _lsq_pass(job, plan)
    else:
        update = (lambda i, layer, lp: _bias_update(layer, job.spec, job.dims, lp, stats[i])) \
            if cfg.compensation == "bias" else None
        with job.timer("apply"):
            _apply_pass(job, plan, update)
    return plan, stats


def _apply_pass(job: _Job, plan: PrunePlan,
                update: Callable[[int, nn.Module, LayerPlan], LayerUpdate] | None) -> None:
    """Apply the plan layer by layer (computing each layer's update while it is loaded)."""
    plan.validate(job.dims)
    shapes = []
    for i, lp in enumerate(plan.layers):
        with job.layers.open(i) as layer:
            upd = update(i, layer, lp) if update is not None else LayerUpdate(OutputUpdate(), OutputUpdate())
            apply_layer(layer, i, job.spec, job.dims, lp, upd, job.config.mode)
            shapes.append(layer_shape(layer, job.spec, job.dims, lp, job.config.mode))
            job.layers.commit(i, layer)
    record_shapes(job.model, shapes, job.config.mode)


def _bias_update(layer: nn.Module, spec: ArchSpec, dims: Dims, lp: LayerPlan, s: LayerStats) -> LayerUpdate:
    proj = output_projections(layer, spec)
    removed_q = complement(head_rows(lp.heads, dims.head_dim), dims.n_heads * dims.head_dim)
    removed_c = complement(lp.channels, dims.d_ff)
    return LayerUpdate(
        OutputUpdate(bias=bias_compensation(proj["attn"].weight, proj["attn"].bias, s.attn.mean, removed_q)),
        OutputUpdate(bias=bias_compensation(proj["mlp"].weight, proj["mlp"].bias, s.mlp.mean, removed_c)),
    )


def _bias_updates(model: nn.Module, spec: ArchSpec, dims: Dims, plan: PrunePlan,
                  stats: list[LayerStats]) -> list[LayerUpdate]:
    """Bias compensation of every layer of an in-memory model (for building plans by hand)."""
    layers = InMemoryLayers(model, spec).modules
    return [_bias_update(layer, spec, dims, lp, s) for layer, lp, s in zip(layers, plan.layers, stats)]


def _lsq_update(proj: nn.Linear, cov: Covariance, kept: torch.Tensor, n: int, damp: float) -> OutputUpdate:
    removed = complement(kept, n)
    w, b = lsq_compensation(proj.weight, proj.bias, cov.mean, cov.cov, kept, removed, damp)
    return OutputUpdate(bias=b, weight=w)


def _lsq_pass(job: _Job, plan: PrunePlan) -> None:
    """Second pass: per layer, the full input covariance of o_proj/down_proj, the least-squares refit,
    and the layer is pruned. Covariances live for one layer only."""
    plan.validate(job.dims)
    cfg, dims, shapes = job.config, job.dims, []

    def visit(idx, layer, inputs):
        lp = plan.layers[idx]
        proj = output_projections(layer, job.spec)
        sinks = {k: Covariance(m.in_features, torch.float32) for k, m in proj.items()}
        with record_inputs(proj, sinks):
            # sequential: statistics from the pruned earlier layers, then propagate with this layer pruned;
            # otherwise propagate the dense outputs now and prune afterwards.
            forward_all(layer, inputs, keep=not cfg.sequential)
        for sink in sinks.values():
            sink.all_reduce_()
        update = LayerUpdate(
            _lsq_update(proj["attn"], sinks["attn"], head_rows(lp.heads, dims.head_dim), dims.n_heads * dims.head_dim,
                        cfg.lsq_damp),
            _lsq_update(proj["mlp"], sinks["mlp"], torch.as_tensor(lp.channels, dtype=torch.long), dims.d_ff,
                        cfg.lsq_damp),
        )
        apply_layer(layer, idx, job.spec, dims, lp, update, cfg.mode)
        shapes.append(layer_shape(layer, job.spec, dims, lp, cfg.mode))
        job.layers.commit(idx, layer)
        return layer if cfg.sequential else None

    job.walk(visit, "lsq compensation")
    record_shapes(job.model, shapes, cfg.mode)


def _group_sum(scores: torch.Tensor, dims: Dims) -> torch.Tensor:
    return scores.reshape(dims.n_kv_heads, -1).sum(1)


def _prune_magnitude(job: _Job) -> PrunePlan:
    def score(i, layer):
        proj = output_projections(layer, job.spec)
        return metrics.magnitude(proj["attn"].weight), metrics.magnitude(proj["mlp"].weight)

    with job.timer("plan"):
        attn, mlp = _scores_of_each_layer(job, score)
        sel = _aligned(uniform(attn, mlp, job.dims, job.config.ratio), mlp, job.config)
        plan = PrunePlan.from_groups(sel.kept_groups, sel.kept_channels, job.dims)
    with job.timer("apply"):
        _apply_pass(job, plan, None)
    return plan


def _prune_wanda_sp(job: _Job) -> PrunePlan:
    """Sequential: each layer's statistics come from the already-pruned previous layers. The walk
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
        _apply_pass(job, plan, None)
    return plan
