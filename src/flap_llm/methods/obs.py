"""obs: choose what to remove by what the least-squares refit can rebuild (structured OBS), and split the
budget over layers and modules by the measured error, not by standardized scores.

Two passes, like FLAP + lsq:
0. One forward and backward pass of the whole model (over FISHER_FRACTION of the windows; the others only run
   through the decoder) gives the Fisher information F of the next-token distribution with respect to every
   o_proj/down_proj output (`fisher.py`): an output error e costs about 1/2 e^T F e of KL divergence, so errors
   weighted by F^(1/2) are comparable across layers and modules. Its forward also records the dense input
   covariances of step 1 when all layers' fit in `fused_budget` (else step 1 walks the layers for them, one at a
   time).
1. On the dense model, each layer's o_proj/down_proj input covariances give FLAP's statistics and each module's
   removal path (`reconstruct.removal_path`: greedy structured OBS on the Fisher-weighted output error, with its
   refit error after every prefix), split under the budget by `reconstruct.allocate`. (The refit itself is the
   plain least squares: weighting the outputs by any invertible matrix leaves its solution unchanged.) With
   allocation "held-out" (the default) the curves are held-out errors: the windows are split in two halves, each
   module's path is fitted on one half and every prefix's refit scored on the other, both ways round, and the two
   curves averaged (the calibration fit error flatters wide projections, which fit their own windows' noise);
   "measured" reads them off the fitted windows (faster, a little worse).
2. The refit pass (`flap.refit_walk`, sequential: each layer's covariances come from the already pruned layers):
   per layer the units chosen by greedy OBS again on this pass's covariances, at its own ridge SELECT_DAMP (the
   refit and the allocation's curves keep `lsq_damp`, so only which units go differs, not how many), the
   least-squares refit of the kept columns (float64), and the layer is pruned.
The greedy paths work in float32 (both the folds' and the refit pass's); the measured allocation's in float64.

Options (ObsOptions): allocation "held-out" | "measured", lsq_damp. A family whose projections feed a norm before
the residual (Obs.refused: Gemma 3) is refused: there the second-order error model under-predicts what removing
a module costs (docs/obs.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration import distributed
from ..model.arch import Dims
from ..model.devices import available_bytes
from ..errors import FlapError
from ..calibration.fisher import output_fisher, streamed_output_fisher, weighting
from ..model.plan import LayerPlan, PrunePlan
from ..math.reconstruct import RemovalPath, allocate, damped, held_out_moment, removal_path
from ..math.select import aligned_count, total_weight
from ..math.stats import ChannelStats, Covariance, LayerStats, SplitCovariance
from ..calibration.walk import InMemoryLayers, forward_all, output_projections, record_inputs
from .base import Method, Options, check_ridge, option
from .flap import refit_walk
from .job import Job

OBS_DAMP = 0.1  # the refit's ridge: chosen by the refit's error on validation windows of the calibration text


@dataclass(frozen=True)
class ObsOptions(Options):
    """obs's options.

    allocation: how many units each layer and module gives up: "held-out" (default: each module's Fisher-weighted
        refit error against its width, scored on the half of the windows each refit was not fitted on) or
        "measured" (scored on the windows fitted: faster, a little worse).
    lsq_damp: the refit's ridge as a fraction of the mean input variance (default 0.1; with many calibration
        windows 0.01 can do better).
    """

    allocation: str = option("held-out", choices=("held-out", "measured"),
                             help="per-module widths by refit errors on held-out halves of the windows (held-out, "
                                  "default) or on the windows fitted (measured: faster, a little worse)")
    lsq_damp: float = option(OBS_DAMP, help=f"the refit's ridge, as a fraction of the mean input variance (default "
                                            f"{OBS_DAMP}; larger: less fitted to the calibration)")

    def validate(self) -> None:
        check_ridge("lsq_damp", self.lsq_damp)

# the largest share of one layer's MLP channels the measured allocation may remove (its paths stop there)
MAX_MLP_REMOVED = 0.9
# the Fisher weighting's ridge, as a fraction of the Fisher matrix's mean eigenvalue
FISHER_RIDGE = 0.01
# the share of the calibration windows whose backward pass estimates the Fisher: half took obs from 3.04x FLAP +
# lsq's time to 2.49x on Qwen2.5-0.5B, with perplexities within 1% of the full Fisher's (BENCHMARKS.md)
FISHER_FRACTION = 0.5
# the ridge of the refit pass's greedy choice of units: a smaller one than the refit's chose better units on both
# models and every ratio measured but one (BENCHMARKS.md, "Other calibration draws")
SELECT_DAMP = 0.01
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


def _paths(layer: nn.Module, job: Job, covs: dict[str, Covariance], counts: tuple[int, int],
           weights: dict[str, torch.Tensor] | None, held_out: dict[str, Covariance] | None = None,
           dtype: torch.dtype = torch.float64, damp: float | None = None) -> tuple[RemovalPath, RemovalPath]:
    """Greedy removal paths of one layer's o_proj (KV groups) and down_proj (channels), to the given counts, on
    the Fisher-weighted output error (`weights`: F^(1/2) per projection; None: the plain output error); with
    `held_out` covariances, every prefix's refit is also scored on those inputs. `dtype`: the paths' working
    precision (`removal_path`); `damp`: the paths' ridge (None: `lsq_damp`)."""
    dims = job.dims
    damp = job.config.options.lsq_damp if damp is None else damp
    proj = output_projections(layer, job.spec)

    def w(name):
        weight = proj[name].weight.detach().to(torch.float64)
        return weight if weights is None else weights[name].to(weight.device) @ weight

    def path(name, unit_size, n_remove, block):
        # V first, in float32 (the paths score in float32), then H: the two float64 [d, d] moments are never
        # held together, and H goes once the path has its own copy (removal_path)
        v = None if held_out is None else held_out_moment(held_out[name].cov, held_out[name].mean,
                                                           covs[name].mean).to(torch.float32)
        return removal_path(w(name), damped(covs[name].cov, damp), unit_size, n_remove, block, None, v, dtype)

    return (path("attn", dims.group_size * dims.head_dim, counts[0], 1),
            path("mlp", 1, counts[1], max(1, dims.d_ff // STEPS)))


def _held_out_curves(layer: nn.Module, job: Job, halves: dict[str, tuple[Covariance, Covariance]],
                     counts: tuple[int, int], weights: dict[str, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """o_proj's and down_proj's error curves as the mean of two held-out curves: paths fitted on one half of
    the windows, scored on the other, and the other way round. These paths only estimate curves (the units are
    chosen again in the refit pass), so they work in float32: the same units and curves as float64 to 1e-5
    (tested), faster on wide MLPs (BENCHMARKS.md, the held-out timing rows)."""
    folds = [_paths(layer, job, {k: h[a] for k, h in halves.items()}, counts, weights,
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
    cfg, opts, dims = job.config, job.config.options, job.dims
    split = opts.allocation == "held-out"
    mlp_cap = min(dims.d_ff, math.floor(MAX_MLP_REMOVED * dims.d_ff))
    stats: list[LayerStats] = []
    curves: list[tuple[torch.Tensor, torch.Tensor]] = []  # each layer's o_proj and down_proj error curves
    recorded: list[dict[str, Covariance]] | None = None  # the dense covariances, from the Fisher pass
    in_memory = isinstance(job.layers, InMemoryLayers)
    embed = job.model.get_input_embeddings().weight
    if in_memory and covariance_bytes(dims) * (2 if split else 1) <= distributed.reduce_min(
            fused_budget(embed.device), embed):
        recorded = [_covariances(output_projections(layer, job.spec), split) for layer in job.layers.modules]
    with job.timer("sensitivity"):
        if in_memory:
            fisher = output_fisher(job.model, job.spec, job.batches, progress=job.progress, inputs=recorded,
                                   fraction=FISHER_FRACTION)
        else:  # streamed from disk: one layer at a time, forward then back
            fisher = streamed_output_fisher(job.model, job.spec, job.batches, job.layers, progress=job.progress,
                                            fraction=FISHER_FRACTION, scratch=job.layers.scratch)
        weights = []  # F^(1/2) per layer, each layer's Fisher released once its weighting is made
        for i, layer in enumerate(fisher):
            weights.append({k: weighting(f, FISHER_RIDGE) for k, f in layer.items()})
            fisher[i] = None
        del fisher

    def survey(idx, layer, covs):
        """FLAP's statistics of one layer, and its dense error curves, from its covariances."""
        for c in covs.values():
            c.all_reduce_()
        counts = (dims.n_kv_heads, mlp_cap)
        if split:  # the merged moments give FLAP's statistics only, and go before the paths; the curves use the halves
            merged = {k: c.merged() for k, c in covs.items()}
            stats.append(LayerStats(_stats_of(merged["attn"]), _stats_of(merged["mlp"])))
            del merged
            curves.append(_held_out_curves(layer, job, {k: c.halves for k, c in covs.items()}, counts, weights[idx]))
        else:
            stats.append(LayerStats(_stats_of(covs["attn"]), _stats_of(covs["mlp"])))
            attn, mlp = _paths(layer, job, covs, counts, weights[idx])
            curves.append((attn.error, mlp.error))

    def walked(idx, layer, inputs):
        proj = output_projections(layer, job.spec)
        covs = _covariances(proj, split)
        with record_inputs(proj, covs):
            forward_all(layer, inputs, keep=True)
        survey(idx, layer, covs)
        return None

    with job.timer("statistics"):
        if recorded is None:
            job.walk(walked, "obs: covariances and removal paths")
        else:
            for idx in tqdm(range(len(job.layers)), desc="obs: removal paths", disable=not job.progress, unit="layer"):
                survey(idx, job.layers.modules[idx], recorded[idx])
                recorded[idx] = None  # each layer's covariances are freed once read

    with job.timer("plan"):  # each layer's (KV groups, MLP channels) removed: the curves' cheapest split of the budget
        budget = cfg.ratio * total_weight(dims)
        costs = [dims.group_weight, 1.0] * dims.n_layers
        flat = allocate([c for pair in curves for c in pair], costs, budget)
        if sum(k * c for k, c in zip(flat, costs)) < budget - 1:
            raise FlapError(f"ratio {cfg.ratio} needs more than the measured allocation may take (every head and "
                            f"{MAX_MLP_REMOVED:.0%} of each layer's MLP channels); use a lower ratio or method flap")
        counts = [(flat[2 * i], _aligned(flat[2 * i + 1], dims.d_ff, cfg.align)) for i in range(dims.n_layers)]

    def choose(idx, layer, covs):
        """Greedy OBS on this pass's covariances (from the pruned earlier layers), in float32 like the folds: on
        Qwen2.5-0.5B's MLPs the same channels as float64 in 23 of 24 layers and counts tried, one swapped near-tie
        (5e-6 apart) in the other."""
        attn, mlp = _paths(layer, job, covs, counts[idx], weights[idx], dtype=torch.float32, damp=SELECT_DAMP)
        return _layer_plan(dims, attn.order, mlp.order)

    with job.timer("compensation"):
        plan = refit_walk(job, choose, "obs: selection and refit", opts.lsq_damp, True)
    return plan, stats


class Obs(Method):
    name = "obs"
    summary = "structured OBS: best measured on SmolLM2 and Qwen, not offered for Gemma 3"
    options = ObsOptions
    refused = {"Gemma3ForCausalLM": "a norm follows o_proj and down_proj (Gemma 3's post-norms), so obs's error model "
                                    "under-predicts what removing a module costs and its plan breaks the model "
                                    "(docs/obs.md)"}
    instead = ("use method flap with compensation lsq (--method flap --compensation lsq), the best measured there")

    def run(self, job: Job, statistics=None) -> tuple[PrunePlan, list[LayerStats]]:
        return prune_obs(job, statistics)

    def compensation(self, options: ObsOptions) -> str:
        return "lsq"  # obs always refits by least squares

    def label(self, options: ObsOptions) -> str:
        return f"obs, {options.allocation} allocation"

    def cost(self, inputs, options: ObsOptions):
        """Two moments of obs follow one another and the peak is the larger: the Fisher pass, then the walk that
        surveys each layer's greedy paths (the refit pass after them needs about as much, counted with it)."""
        from ..reporting.estimate import Cost
        from ..calibration.fisher import HIDDEN_MEMORY_SHARE
        s, b, offload = inputs.shapes, inputs.bytes_per_weight, inputs.offload
        h, f, attn = s.hidden, s.d_ff, s.n_heads * s.head_dim
        split = options.allocation == "held-out"
        cov = covariance_bytes(s.dims) * (2 if split else 1)
        fisher_tokens = int(inputs.tokens * FISHER_FRACTION)
        fisher_batch = max(1, round(inputs.batch_size * FISHER_FRACTION))  # the drawn windows of a batch
        sums = "Fisher sums (every layer)"  # streamed: on the host, a layer at a time
        parts = {sums: s.n_layers * 2 * h * h * 8}
        fisher_phase, walk_phase = {}, {}
        host = {"streamed Fisher: saved layer inputs (host)"}
        if offload:
            saved = s.n_layers * fisher_tokens * h * 4
            free = inputs.available("cpu")
            kept = saved if free is None else min(saved, int(HIDDEN_MEMORY_SHARE * free))
            fisher_phase["streamed Fisher: saved layer inputs (host)"] = kept
            fisher_phase["streamed Fisher: the head, read for it"] = s.head_params * b
            fisher_phase["streamed Fisher: head's logits and gradient"] = fisher_batch * inputs.seqlen * s.vocab * 4 * 3
            fused = 0
            host.add(sums)
        else:
            free = inputs.available(inputs.device)  # fused_budget, for a device this machine may not have
            budget = FUSED_COVARIANCE_BYTES if free is None else min(FUSED_COVARIANCE_BYTES,
                                                                     int(FUSED_COVARIANCE_SHARE * free))
            fused = cov if cov <= budget else 0
            # per token and layer the graph keeps about 8 hidden-wide and 4 MLP-wide activations and a row of
            # attention weights per head; then the logits, their softmax and its gradient
            fisher_phase["Fisher pass: one batch through the whole model"] = fisher_batch * inputs.seqlen * (
                s.n_layers * (8 * h + 4 * f + s.n_heads * inputs.seqlen) * b + s.vocab * 4 * 3)
        if fused:  # recorded in the Fisher pass and held until the walk reads them
            recorded = "dense covariances recorded in the Fisher pass"
            fisher_phase[recorded] = walk_phase[recorded] = fused
        else:
            walk_phase["the walk: one layer's covariances"] = cov // s.n_layers
        # the widest projection's greedy path and the refit after it (measured: 44 and 40 bytes per f^2 with
        # the layer's covariances, at two widths; BENCHMARKS.md): H and V made one after the other, the path's
        # inverse, V and pending steps (float32 under the held-out split, float64 without), the refit's solve
        walk_phase["greedy paths of one layer"] = max(f, attn) ** 2 * (28 if split else 32)
        parts.update(max(fisher_phase, walk_phase, key=lambda phase: sum(phase.values())))
        steps = int(MAX_MLP_REMOVED * STEPS)
        greedy = {"paths": s.n_layers * 2 * ((2 if split else 1) + 1), "mlp_width": f, "mlp_steps_per_path": steps,
                  "kv_groups_per_layer": s.n_kv}
        return Cost(parts=parts, forward=3 if (offload or cov > FUSED_COVARIANCE_BYTES) else 2, backward=1,
                    work={"greedy paths": greedy}, host=host)
