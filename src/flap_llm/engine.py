"""The one verb: prune(model, calibration, config) -> PruneResult, in place."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from . import distributed, metrics
from .apply import LayerUpdate, OutputUpdate, apply_layer, apply_plan, complement, head_rows, record_shapes
from .arch import (ArchSpec, Dims, architecture_of, check_dense, decoder_layers, decoder_weight_params, dims_of,
                   model_params, spec_of)
from .compensate import bias_compensation, lsq_compensation
from .config import PruneConfig
from .errors import FlapError
from .plan import LayerPlan, PrunePlan
from .report import Timer, layer_report, param_report, versions
from .select import Selection, align_channels, drop_lowest, select, uniform
from .stats import Covariance, LayerStats
from .walk import as_batches, collect_statistics, forward_all, layer_stats, output_projections, record_inputs, walk


@dataclass
class PruneResult:
    plan: PrunePlan
    config: PruneConfig
    report: dict = field(default_factory=dict)
    stats: list[LayerStats] | None = None  # dense calibration statistics (flap only)


def prune(model: nn.Module, calibration: torch.Tensor | Iterable[torch.Tensor] | None,
          config: PruneConfig = PruneConfig(), *, batch_size: int = 8, progress: bool = False,
          statistics: list[LayerStats] | None = None) -> PruneResult:
    """Prune a Hugging Face causal LM in place and return the plan and a report.

    calibration: token ids, a LongTensor [N, L] or an iterable of [B, L] batches (mag-sp needs none).
    statistics: FLAP's dense statistics from an earlier result (`result.stats`) of the same model and
        calibration, to try several ratios, metrics or structures without another calibration pass.
    Everything is validated before the first weight changes.
    """
    if not isinstance(config, PruneConfig):
        raise FlapError("config must be a flap_llm.PruneConfig")
    timer = Timer()
    spec = spec_of(model)
    dims = dims_of(model)
    check_dense(model, spec, dims)
    max_groups = dims.n_layers * dims.n_kv_heads
    if config.remove_heads is not None and config.remove_heads > max_groups:
        raise FlapError(f"remove_heads={config.remove_heads} but the model has only {max_groups} KV groups "
                        f"({dims.n_layers} layers x {dims.n_kv_heads})")
    batches = None
    if calibration is not None or config.needs_data:
        if calibration is None:
            raise FlapError(f"method {config.method} needs calibration token ids")
        batches = as_batches(calibration, batch_size, model.config.vocab_size)
        n_windows = sum(b.shape[0] for b in batches)
        if distributed.active():  # each rank takes its share of the windows; statistics are all-reduced
            batches = list(distributed.shard(torch.cat(batches)).split(batch_size))
    decoder_before, model_before = decoder_weight_params(model, spec), model_params(model)
    was_training = model.training
    model.eval()
    stats = None
    try:
        with torch.no_grad():
            if config.method == "flap":
                plan, stats = _prune_flap(model, spec, dims, batches, config, timer, progress, statistics)
            elif config.method == "mag-sp":
                plan = _prune_magnitude(model, spec, dims, config, timer)
            else:
                plan = _prune_wanda_sp(model, spec, dims, batches, config, timer, progress)
    finally:
        model.train(was_training)
    report = {
        "architecture": architecture_of(model),
        "config": config.to_dict(),
        "compensation": config.effective_compensation,
        "params": param_report(model, spec, dims, plan, decoder_before, model_before, config.mode),
        "layers": layer_report(plan, dims),
        "calibration": None if batches is None else {
            "windows": n_windows, "seqlen": batches[0].shape[1],
            "tokens": sum(b.numel() for b in batches), "batch_size": batch_size,
            "world_size": distributed.world_size()},
        "timings_s": {**timer.sections, "total": sum(timer.sections.values())},
        "versions": versions(),
    }
    return PruneResult(plan=plan, config=config, report=report, stats=stats)


def _aligned(sel: Selection, mlp_scores: list[torch.Tensor], config: PruneConfig) -> Selection:
    if not config.align:
        return sel
    return Selection(sel.kept_groups, [align_channels(k, s, config.align) for k, s in zip(sel.kept_channels, mlp_scores)])


def _flap_scores(model: nn.Module, spec: ArchSpec, stats: list[LayerStats], metric: str):
    attn, mlp = [], []
    for layer, s in zip(decoder_layers(model, spec), stats):
        proj = output_projections(layer, spec)
        attn.append(metrics.fluctuation(metric, s.attn, proj["attn"].weight) ** 2)
        mlp.append(metrics.fluctuation(metric, s.mlp, proj["mlp"].weight))
    return attn, mlp


def _prune_flap(model, spec, dims, batches, config, timer, progress, stats=None):
    if stats is not None:
        if len(stats) != dims.n_layers or stats[0].mlp.dim != dims.d_ff:
            raise FlapError("statistics do not match this model; pass the `stats` of a result for the same dense model")
    else:
        with timer("statistics"):
            stats = collect_statistics(model, spec, batches, progress)
    with timer("plan"):
        attn, mlp = _flap_scores(model, spec, stats, config.metric)
        sel = select(config.structure, attn, mlp, dims, config.ratio, config.remove_heads)
        sel = _aligned(sel, mlp, config)
        plan = PrunePlan.from_groups(sel.kept_groups, sel.kept_channels, dims)
    if config.compensation == "lsq":
        with timer("compensation"):
            _apply_lsq(model, spec, dims, batches, plan, config, progress)
        return plan, stats
    with timer("apply"):
        updates = _bias_updates(model, spec, dims, plan, stats) if config.compensation == "bias" else None
        apply_plan(model, spec, dims, plan, updates, config.mode)
    return plan, stats


def _bias_updates(model, spec, dims: Dims, plan: PrunePlan, stats: list[LayerStats]) -> list[LayerUpdate]:
    updates = []
    for layer, lp, s in zip(decoder_layers(model, spec), plan.layers, stats):
        proj = output_projections(layer, spec)
        removed_q = complement(head_rows(lp.heads, dims.head_dim), dims.n_heads * dims.head_dim)
        removed_c = complement(lp.channels, dims.d_ff)
        updates.append(LayerUpdate(
            OutputUpdate(bias=bias_compensation(proj["attn"].weight, proj["attn"].bias, s.attn.mean, removed_q)),
            OutputUpdate(bias=bias_compensation(proj["mlp"].weight, proj["mlp"].bias, s.mlp.mean, removed_c)),
        ))
    return updates


def _lsq_update(proj: nn.Linear, cov: Covariance, kept: torch.Tensor, n: int, damp: float) -> OutputUpdate:
    removed = complement(kept, n)
    w, b = lsq_compensation(proj.weight, proj.bias, cov.mean, cov.cov, kept, removed, damp)
    return OutputUpdate(bias=b, weight=w)


def _apply_lsq(model, spec, dims: Dims, batches, plan: PrunePlan, config: PruneConfig, progress: bool) -> None:
    """Second pass: per layer, the full input covariance of o_proj/down_proj, the least-squares refit,
    and the layer is pruned. Covariances live for one layer only."""
    plan.validate(dims)

    def visit(idx, layer, inputs):
        lp = plan.layers[idx]
        proj = output_projections(layer, spec)
        sinks = {k: Covariance(m.in_features, torch.float32) for k, m in proj.items()}
        with record_inputs(proj, sinks):
            # sequential: statistics from the pruned earlier layers, then propagate with this layer pruned;
            # otherwise propagate the dense outputs now and prune afterwards.
            forward_all(layer, inputs, keep=not config.sequential)
        update = LayerUpdate(
            _lsq_update(proj["attn"], sinks["attn"], head_rows(lp.heads, dims.head_dim), dims.n_heads * dims.head_dim,
                        config.lsq_damp),
            _lsq_update(proj["mlp"], sinks["mlp"], torch.as_tensor(lp.channels, dtype=torch.long), dims.d_ff,
                        config.lsq_damp),
        )
        for sink in sinks.values():
            sink.all_reduce_()
        apply_layer(layer, idx, spec, dims, lp, update, config.mode)
        return layer if config.sequential else None

    walk(model, spec, batches, visit, progress, desc="lsq compensation")
    record_shapes(model, spec, dims, plan, config.mode)


def _uniform_counts(dims: Dims, ratio: float) -> tuple[int, int]:
    return math.floor(ratio * dims.n_kv_heads), math.floor(ratio * dims.d_ff)


def _group_sum(scores: torch.Tensor, dims: Dims) -> torch.Tensor:
    return scores.reshape(dims.n_kv_heads, -1).sum(1)


def _prune_magnitude(model, spec, dims: Dims, config: PruneConfig, timer: Timer) -> PrunePlan:
    with timer("plan"):
        attn, mlp = [], []
        for layer in decoder_layers(model, spec):
            proj = output_projections(layer, spec)
            attn.append(metrics.magnitude(proj["attn"].weight))
            mlp.append(metrics.magnitude(proj["mlp"].weight))
        sel = _aligned(uniform(attn, mlp, dims, config.ratio), mlp, config)
        plan = PrunePlan.from_groups(sel.kept_groups, sel.kept_channels, dims)
    with timer("apply"):
        apply_plan(model, spec, dims, plan, None, config.mode)
    return plan


def _prune_wanda_sp(model, spec, dims: Dims, batches, config: PruneConfig, timer: Timer, progress: bool) -> PrunePlan:
    """Sequential: each layer's statistics come from the already-pruned previous layers. The walk
    prunes a copy of each layer to propagate; the model itself changes only once the plan is whole."""
    n_groups, n_channels = _uniform_counts(dims, config.ratio)
    layer_plans: list[LayerPlan] = []

    def visit(idx, layer, inputs):
        s = layer_stats(layer, spec, inputs, keep=False, layer_idx=idx)
        proj = output_projections(layer, spec)
        groups = drop_lowest(_group_sum(metrics.wanda_sp(s.attn, proj["attn"].weight), dims), n_groups)
        mlp_scores = metrics.wanda_sp(s.mlp, proj["mlp"].weight)
        channels = drop_lowest(mlp_scores, n_channels)
        if config.align:
            channels = align_channels(channels, mlp_scores, config.align)
        lp = PrunePlan.from_groups([groups], [channels], dims).layers[0]
        layer_plans.append(lp)
        pruned = copy.deepcopy(layer)
        apply_layer(pruned, idx, spec, dims, lp, LayerUpdate(OutputUpdate(), OutputUpdate()), "prune")
        return pruned

    with timer("statistics"):
        walk(model, spec, batches, visit, progress, desc="wanda-sp")
    plan = PrunePlan(tuple(layer_plans))
    with timer("apply"):
        apply_plan(model, spec, dims, plan, None, config.mode)
    return plan
