"""The one verb: prune(model, calibration, config) -> PruneResult, in place.

Every pass touches the decoder layers through a layer provider (`InMemoryLayers`, or the offloaded one
that streams layers from disk), so the same code prunes a model in memory or one larger than memory.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from .calibration import distributed
from .model.arch import (ArchSpec, Dims, architecture_of, check_dense, decoder_weight_params, dims_of, model_params,
    spec_of)
from .config import PruneConfig
from .errors import FlapError
from .methods import registry
from .methods.job import Job
from .model.plan import PrunePlan
from .reporting.report import PruneReport, Timer, layer_report, param_report, versions
from .math.stats import LayerStats
from .calibration.walk import InMemoryLayers, LayerProvider, as_batches


@dataclass
class PruneResult:
    plan: PrunePlan
    config: PruneConfig
    report: PruneReport
    stats: list[LayerStats] | None = None  # dense calibration statistics (flap only)


def prune(model: nn.Module, calibration: torch.Tensor | Iterable[torch.Tensor] | None,
          config: PruneConfig = PruneConfig(), *, batch_size: int = 8, progress: bool = False,
          statistics: list[LayerStats] | None = None, layers: LayerProvider | None = None) -> PruneResult:
    """Prune a Hugging Face causal LM in place and return the plan and a report.

    calibration: token ids, a LongTensor [N, L] or an iterable of [B, L] batches (mag-sp needs none).
    statistics: FLAP's dense statistics from an earlier result (`result.stats`) of the same model and
        calibration, to try several ratios, metrics or structures without another calibration pass.
    layers: a layer provider (walk.LayerProvider); the default works on the model in memory (see offload.py
        for the other).
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
    if statistics is not None and not registry.get(config.method).uses_statistics:
        raise FlapError(f"statistics are FLAP's dense statistics; method {config.method} does not use them")
    decoder_before, model_before = decoder_weight_params(model, spec), model_params(model)
    layers = layers if layers is not None else InMemoryLayers(model, spec)
    job = Job(model, spec, dims, batches, config, timer, progress, layers)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            plan, stats = registry.get(config.method).run(job, statistics)
    finally:
        model.train(was_training)
    report = PruneReport(
        architecture=architecture_of(model),
        config=config.to_dict(),
        compensation=config.effective_compensation,
        dense_shape={"num_hidden_layers": dims.n_layers, "num_attention_heads": dims.n_heads,
                     "num_key_value_heads": dims.n_kv_heads, "head_dim": dims.head_dim,
                     "hidden_size": dims.hidden, "intermediate_size": dims.d_ff},
        params=param_report(model, spec, dims, plan, decoder_before, model_before, config.mode),
        layers=layer_report(plan, dims),
        calibration=None if batches is None else {
            "windows": n_windows, "seqlen": batches[0].shape[1], "tokens": n_windows * batches[0].shape[1],
            "batch_size": batch_size, "world_size": distributed.world_size()},
        timings_s={**timer.sections, "total": sum(timer.sections.values())},
        versions=versions(),
        offload=layers.info(),
    )
    return PruneResult(plan=plan, config=config, report=report, stats=stats)


def check_method_offered(model: nn.Module, config: PruneConfig) -> None:
    """Refuse a method the model's family is not offered (from the architecture alone: before any weight)."""
    refusal = registry.get(config.method).refusal(architecture_of(model))
    if refusal:
        raise FlapError(refusal)


def check_model(model: nn.Module, config: PruneConfig) -> tuple[ArchSpec, Dims]:
    """Everything about the model and config that can be refused before any pass (or any evaluation) runs."""
    if not isinstance(config, PruneConfig):
        raise FlapError("config must be a flap_llm.PruneConfig")
    spec = spec_of(model)
    dims = dims_of(model)
    check_dense(model, spec, dims)
    check_method_offered(model, config)
    max_groups = dims.n_layers * dims.n_kv_heads
    remove_heads = getattr(config.options, "remove_heads", None)
    if remove_heads is not None and remove_heads > max_groups:
        raise FlapError(f"remove_heads={remove_heads} but the model has only {max_groups} KV groups "
                        f"({dims.n_layers} layers x {dims.n_kv_heads})")
    if config.align is not None and config.align > dims.d_ff:
        raise FlapError(f"align={config.align} is larger than the model's MLP width {dims.d_ff}: every channel would "
                        "go; use a multiple such as 32, 64 or 128")
    return spec, dims
