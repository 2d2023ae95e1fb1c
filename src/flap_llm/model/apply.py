"""Apply a plan to a model: slice the weights ("prune") or zero them ("mask")."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .arch import ArchSpec, Dims, attention_block, check_dense, dims_of, input_projs, output_proj, spec_of
from ..errors import FlapError
from .modeling_flap import ConstantAttention, own_head_counts
from .plan import LayerPlan, PrunePlan


@dataclass
class OutputUpdate:
    """New parameters of an output projection (o_proj or down_proj) for its kept inputs."""

    bias: torch.Tensor | None = None  # [d_out], float64; None leaves the bias as it is
    weight: torch.Tensor | None = None  # [d_out, |kept|], float64; None keeps the old kept columns


@dataclass
class LayerUpdate:
    attn: OutputUpdate
    mlp: OutputUpdate


def complement(kept: torch.Tensor | tuple[int, ...], n: int) -> torch.Tensor:
    mask = torch.ones(n, dtype=torch.bool)
    mask[torch.as_tensor(kept, dtype=torch.long)] = False
    return torch.nonzero(mask).flatten()


def head_rows(heads: tuple[int, ...] | list[int], head_dim: int) -> torch.Tensor:
    """Row indices of q (or k/v) for the given heads: head h owns rows [h*hd, (h+1)*hd)."""
    h = torch.as_tensor(list(heads), dtype=torch.long)
    return (h[:, None] * head_dim + torch.arange(head_dim)[None, :]).flatten()


def _param(t: torch.Tensor, like: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.to(device=like.device, dtype=like.dtype).contiguous(), requires_grad=like.requires_grad)


def _keep_rows(lin: nn.Linear, rows: torch.Tensor) -> None:
    rows = rows.to(lin.weight.device)
    lin.weight = _param(lin.weight.data[rows], lin.weight)
    if lin.bias is not None:
        lin.bias = _param(lin.bias.data[rows], lin.bias)
    lin.out_features = rows.numel()


def _mask_rows(lin: nn.Linear, rows: torch.Tensor) -> None:
    rows = rows.to(lin.weight.device)
    lin.weight.data[rows] = 0
    if lin.bias is not None:
        lin.bias.data[rows] = 0


def _update_output(lin: nn.Linear, kept: torch.Tensor, removed: torch.Tensor, upd: OutputUpdate, mode: str) -> None:
    """Shrink or mask the input columns of an output projection, then install the new bias/weights."""
    w = lin.weight
    if mode == "prune":
        cols = upd.weight if upd.weight is not None else w.data[:, kept.to(w.device)]
        lin.weight = _param(cols, w)
        lin.in_features = kept.numel()
    else:
        if upd.weight is not None:
            w.data[:, kept.to(w.device)] = upd.weight.to(w.device, w.dtype)
        w.data[:, removed.to(w.device)] = 0
    if upd.bias is not None:
        lin.bias = _param(upd.bias, w)


def _input_rows(spec: ArchSpec, dims: Dims, lp: LayerPlan, module: str) -> list[torch.Tensor]:
    """Kept rows of each input projection of a dense layer, in the order of `input_projs` (for a fused
    matrix, the kept rows of each part offset by the parts before it)."""
    if module == "attn":
        hd = dims.head_dim
        q, kv = head_rows(lp.heads, hd), head_rows(lp.kv_heads, hd)
        parts = [q, kv, kv]
        sizes = [dims.n_heads * hd, dims.n_kv_heads * hd, dims.n_kv_heads * hd]
        fused = spec.qkv
    else:
        c = torch.as_tensor(lp.channels, dtype=torch.long)
        parts, sizes, fused = [c, c], [dims.d_ff, dims.d_ff], spec.gate_up
    if not fused:
        return parts
    offsets = torch.tensor([0, *sizes[:-1]]).cumsum(0)
    return [torch.cat([rows + int(off) for rows, off in zip(parts, offsets)])]


def apply_layer(layer: nn.Module, layer_idx: int, spec: ArchSpec, dims: Dims, lp: LayerPlan,
                update: LayerUpdate, mode: str) -> None:
    kept_in = {"attn": head_rows(lp.heads, dims.head_dim), "mlp": torch.as_tensor(lp.channels, dtype=torch.long)}
    width = {"attn": dims.n_heads * dims.head_dim, "mlp": dims.d_ff}
    for module, upd in (("attn", update.attn), ("mlp", update.mlp)):
        for lin, rows in zip(input_projs(layer, spec, module), _input_rows(spec, dims, lp, module)):
            if mode == "prune":
                _keep_rows(lin, rows)
            else:
                _mask_rows(lin, complement(rows, lin.out_features))
        kept = kept_in[module]
        _update_output(output_proj(layer, spec, module), kept, complement(kept, width[module]), upd, mode)
    if mode == "prune" and spec.attn_reads_config:
        own_head_counts(attention_block(layer, spec), len(lp.heads), len(lp.kv_heads))
    if mode == "prune" and not lp.heads:
        setattr(layer, spec.attn, ConstantAttention(attention_block(layer, spec), layer_idx, spec.o))


def layer_shape(layer: nn.Module, spec: ArchSpec, dims: Dims, lp: LayerPlan, mode: str) -> dict:
    """The shapes and bias flags a pruned layer needs to be rebuilt when loading."""
    o, down = output_proj(layer, spec, "attn"), output_proj(layer, spec, "mlp")
    if mode == "prune":
        n_heads, n_kv, d_ff = len(lp.heads), len(lp.kv_heads), len(lp.channels)
    else:
        n_heads, n_kv, d_ff = dims.n_heads, dims.n_kv_heads, dims.d_ff
    return {"num_attention_heads": n_heads, "num_key_value_heads": n_kv, "intermediate_size": d_ff,
            "o_proj_bias": o.bias is not None, "down_proj_bias": down.bias is not None}


def record_shapes(model: nn.Module, shapes: list[dict], mode: str) -> None:
    """Per-layer shapes on the config, so the model can be rebuilt when loading."""
    model.config.flap_layers = shapes
    model.config.flap_mode = mode


UpdateFn = Callable[[int, nn.Module, LayerPlan], LayerUpdate]


def apply_plan(model: nn.Module, plan: PrunePlan | dict, updates: list[LayerUpdate] | UpdateFn | None = None, *,
               mode: str = "prune", layers=None) -> None:
    """Apply a plan to a dense model, in place: slice the weights ("prune") or zero them ("mask").

    plan: a PrunePlan or its dict form (`PrunePlan.to_dict()`, as a checkpoint's manifest stores it), so a
        saved plan can be applied again to the dense model it came from.
    updates: what the output projections get for the kept inputs: None keeps their kept columns and biases
        (no compensation); a list with one LayerUpdate per layer; or a function (index, layer, LayerPlan)
        -> LayerUpdate, called while the layer is loaded (the engine's compensation).
    layers: a walk.LayerProvider (default: the model's layers in memory).
    The plan and the model are checked before the first weight changes.
    """
    from ..calibration.walk import InMemoryLayers

    if mode not in ("prune", "mask"):
        raise FlapError(f"unknown mode {mode!r}; choose prune or mask")
    spec, dims = spec_of(model), dims_of(model)
    if isinstance(plan, dict):
        plan = PrunePlan.from_dict(plan)
    plan.validate(dims)
    check_dense(model, spec, dims)
    if isinstance(updates, list) and len(updates) != dims.n_layers:
        raise FlapError(f"updates has {len(updates)} entries, the model {dims.n_layers} layers")
    layers = layers if layers is not None else InMemoryLayers(model, spec)
    if plan.dropped and mode == "prune" and not isinstance(layers, InMemoryLayers):
        raise FlapError("a plan that drops whole layers needs the model in memory (not streamed from disk)")
    dropped = set(plan.dropped) if mode == "prune" else set()  # mode "mask" zeroes them: an identity layer
    shapes = []
    for i, lp in enumerate(plan.layers):
        if i in dropped:
            continue
        with layers.open(i) as layer:
            if updates is None:
                upd = LayerUpdate(OutputUpdate(), OutputUpdate())
            else:
                upd = updates[i] if isinstance(updates, list) else updates(i, layer, lp)
            apply_layer(layer, i, spec, dims, lp, upd, mode)
            shapes.append(layer_shape(layer, spec, dims, lp, mode))
            layers.commit(i, layer)
    if dropped:
        drop_layers(model, spec, sorted(dropped))
    record_shapes(model, shapes, mode)


def drop_layers(model: nn.Module, spec: ArchSpec, dropped: list[int]) -> None:
    """Remove whole decoder layers, in place: the kept ones are renumbered (their caches are indexed by it) and
    the config gets the new layer count and the kept layers' own per-layer attributes (`layer_types`: Gemma 3's
    local/global pattern, the sliding-window layers of Qwen and Mistral). The original indices of the kept
    layers are recorded in config.flap_kept_layers."""
    from .arch import decoder_layers, get_module
    old = decoder_layers(model, spec)
    n = len(old)
    keep = [i for i in range(n) if i not in set(dropped)]
    config = model.config
    types = getattr(config, "layer_types", None)
    if types is not None and len(types) != n:
        raise FlapError(f"config.layer_types has {len(types)} entries for {n} layers")
    kept = nn.ModuleList([old[i] for i in keep])
    for new_idx, layer in enumerate(kept):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_idx
    parent_path, _, name = spec.layers.rpartition(".")
    setattr(get_module(model, parent_path) if parent_path else model, name, kept)
    original = getattr(config, "flap_kept_layers", None) or list(range(n))
    config.flap_kept_layers = [original[i] for i in keep]
    config.num_hidden_layers = len(keep)
    if types is not None:
        config.layer_types = [types[i] for i in keep]
