"""Apply a plan to a model: slice the weights ("prune") or zero them ("mask")."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .arch import ArchSpec, Dims, attention_parts, decoder_layers, mlp_parts
from .modeling_flap import ConstantAttention
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


def apply_layer(layer: nn.Module, layer_idx: int, spec: ArchSpec, dims: Dims, lp: LayerPlan,
                update: LayerUpdate, mode: str) -> None:
    q, k, v, o = attention_parts(layer, spec)
    hd = dims.head_dim
    kept_q = head_rows(lp.heads, hd)
    kept_kv = head_rows(lp.kv_heads, hd)
    if mode == "prune":
        _keep_rows(q, kept_q)
        _keep_rows(k, kept_kv)
        _keep_rows(v, kept_kv)
    else:
        _mask_rows(q, complement(kept_q, q.out_features))
        _mask_rows(k, complement(kept_kv, k.out_features))
        _mask_rows(v, complement(kept_kv, v.out_features))
    _update_output(o, kept_q, complement(kept_q, dims.n_heads * hd), update.attn, mode)
    if mode == "prune" and not lp.heads:
        setattr(layer, spec.attn, ConstantAttention(getattr(layer, spec.attn), layer_idx, spec.o))

    gate, up, down = mlp_parts(layer, spec)
    kept_c = torch.as_tensor(lp.channels, dtype=torch.long)
    removed_c = complement(kept_c, dims.d_ff)
    if mode == "prune":
        _keep_rows(gate, kept_c)
        _keep_rows(up, kept_c)
    else:
        _mask_rows(gate, removed_c)
        _mask_rows(up, removed_c)
    _update_output(down, kept_c, removed_c, update.mlp, mode)


def layer_shape(layer: nn.Module, spec: ArchSpec, dims: Dims, lp: LayerPlan, mode: str) -> dict:
    """The shapes and bias flags a pruned layer needs to be rebuilt when loading."""
    _, _, _, o = attention_parts(layer, spec)
    _, _, down = mlp_parts(layer, spec)
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


def apply_plan(model: nn.Module, spec: ArchSpec, dims: Dims, plan: PrunePlan,
               updates: list[LayerUpdate] | None, mode: str) -> None:
    """Apply the plan to every decoder layer of an in-memory model and record the new shapes."""
    plan.validate(dims)
    shapes = []
    for i, (layer, lp) in enumerate(zip(decoder_layers(model, spec), plan.layers)):
        upd = updates[i] if updates is not None else LayerUpdate(OutputUpdate(), OutputUpdate())
        apply_layer(layer, i, spec, dims, lp, upd, mode)
        shapes.append(layer_shape(layer, spec, dims, lp, mode))
    record_shapes(model, shapes, mode)
