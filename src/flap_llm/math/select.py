"""Which units each layer keeps: the four structures of FLAP (pure tensor math).

Inputs are per-layer channel scores: attention scores over the n_heads*head_dim inputs of o_proj
(already squared for FLAP) and MLP scores over the d_ff inputs of down_proj. A KV group k owns the
query heads [k*g, (k+1)*g) and so the o_proj channels [k*g*head_dim, (k+1)*g*head_dim).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..model.arch import Dims
from ..errors import FlapError


@dataclass
class Selection:
    kept_groups: list[torch.Tensor]  # per layer: sorted LongTensor of kept KV-group indices
    kept_channels: list[torch.Tensor]  # per layer: sorted LongTensor of kept MLP channels


def standardize(s: torch.Tensor) -> torch.Tensor:
    """z = (s - mean) / std with the unbiased std; a constant vector standardizes to zeros."""
    s = s.to(torch.float64)
    if s.numel() < 2:
        return torch.zeros_like(s)
    std = s.std(unbiased=True)
    if not torch.isfinite(std) or std == 0:
        return torch.zeros_like(s)
    return (s - s.mean()) / std


def drop_lowest(scores: torch.Tensor, n_remove: int) -> torch.Tensor:
    """Indices kept after removing the n_remove lowest scores (stable on ties), sorted."""
    order = torch.sort(scores.cpu(), stable=True).indices
    return torch.sort(order[n_remove:]).values


def _by_group(attn_scores: torch.Tensor, dims: Dims) -> torch.Tensor:
    # attn_scores: [n_heads * head_dim] -> [n_kv_heads, g * head_dim]
    return attn_scores.reshape(dims.n_kv_heads, dims.group_size * dims.head_dim)


def total_weight(dims: Dims) -> float:
    """All attention+MLP units of the decoder, in units of one MLP channel."""
    return dims.n_layers * (dims.n_kv_heads * dims.group_weight + dims.d_ff)


def _mlp_channels_to_remove(ratio: float, removed_groups: int, dims: Dims) -> int:
    """MLP channels that bring the removed weight to the ratio, given the groups already removed."""
    budget = ratio * total_weight(dims) - removed_groups * dims.group_weight
    return max(0, math.floor(budget + 1e-9))


def select(
    structure: str,
    attn_scores: list[torch.Tensor],
    mlp_scores: list[torch.Tensor],
    dims: Dims,
    ratio: float,
    remove_heads: int | None = None,
) -> Selection:
    """The units every layer keeps under `structure` (a key of STRUCTURES)."""
    if structure not in STRUCTURES:
        raise FlapError(f"unknown structure {structure!r}; choose one of: {', '.join(STRUCTURES)}")
    if structure not in MANUAL_STRUCTURES:
        return STRUCTURES[structure](attn_scores, mlp_scores, dims, ratio)
    max_groups = dims.n_layers * dims.n_kv_heads
    if remove_heads is None or not 0 <= remove_heads <= max_groups:
        raise FlapError(f"remove_heads must be between 0 and {max_groups} (the model's KV groups), got {remove_heads}")
    return STRUCTURES[structure](attn_scores, mlp_scores, dims, ratio, remove_heads)


def uniform(attn_scores, mlp_scores, dims: Dims, ratio: float) -> Selection:
    """UL-UM: every layer drops floor(ratio*n) of its lowest groups and of its lowest channels."""
    n_groups = math.floor(ratio * dims.n_kv_heads)
    n_channels = math.floor(ratio * dims.d_ff)
    return Selection(
        [drop_lowest(_by_group(a, dims).sum(1), n_groups) for a in attn_scores],
        [drop_lowest(m, n_channels) for m in mlp_scores],
    )


def uniform_manual(attn_scores, mlp_scores, dims: Dims, ratio: float, remove_heads: int) -> Selection:
    """UL-MM: remove_heads groups spread evenly over layers (the remainder to the last layers),
    and the same number of MLP channels in every layer, so that the total matches the ratio."""
    base, extra = divmod(remove_heads, dims.n_layers)
    per_layer = [base + (1 if i >= dims.n_layers - extra else 0) for i in range(dims.n_layers)]
    n_channels = min(dims.d_ff, _mlp_channels_to_remove(ratio, remove_heads, dims) // dims.n_layers)
    return Selection(
        [drop_lowest(_by_group(a, dims).sum(1), r) for a, r in zip(attn_scores, per_layer)],
        [drop_lowest(m, n_channels) for m in mlp_scores],
    )


def _standardized_units(attn_scores, mlp_scores, dims: Dims) -> tuple[torch.Tensor, torch.Tensor]:
    """Group scores (mean z over the group's channels) and MLP channel z-scores, all layers flat."""
    groups = torch.cat([_by_group(standardize(a), dims).mean(1) for a in attn_scores])
    channels = torch.cat([standardize(m) for m in mlp_scores])
    return groups.cpu(), channels.cpu()


def _unflatten(kept: torch.Tensor, per_layer: int, n_layers: int) -> list[torch.Tensor]:
    kept = torch.sort(kept).values
    return [kept[(kept >= i * per_layer) & (kept < (i + 1) * per_layer)] - i * per_layer for i in range(n_layers)]


def adaptive(attn_scores, mlp_scores, dims: Dims, ratio: float) -> Selection:
    """AL-AM: one global list of all groups and channels, by standardized score, descending;
    keep the prefix whose cumulative weight stays within (1 - ratio) of the total."""
    groups, channels = _standardized_units(attn_scores, mlp_scores, dims)
    scores = torch.cat([groups, channels])
    weights = torch.cat([
        torch.full((groups.numel(),), dims.group_weight, dtype=torch.float64),
        torch.ones(channels.numel(), dtype=torch.float64),
    ])
    order = torch.sort(scores, descending=True, stable=True).indices
    budget = (1.0 - ratio) * total_weight(dims)
    fits = torch.cumsum(weights[order], 0) <= budget * (1 + 1e-12)
    n_keep = int(fits.numel() if fits.all() else torch.nonzero(~fits)[0, 0])
    kept = order[:n_keep]
    n_g = groups.numel()
    return Selection(
        _unflatten(kept[kept < n_g], dims.n_kv_heads, dims.n_layers),
        _unflatten(kept[kept >= n_g] - n_g, dims.d_ff, dims.n_layers),
    )


def adaptive_manual(attn_scores, mlp_scores, dims: Dims, ratio: float, remove_heads: int) -> Selection:
    """AL-MM: the remove_heads lowest groups globally, then the lowest MLP channels globally
    for the rest of the parameter budget."""
    groups, channels = _standardized_units(attn_scores, mlp_scores, dims)
    n_channels = min(channels.numel(), _mlp_channels_to_remove(ratio, remove_heads, dims))
    return Selection(
        _unflatten(drop_lowest(groups, remove_heads), dims.n_kv_heads, dims.n_layers),
        _unflatten(drop_lowest(channels, n_channels), dims.d_ff, dims.n_layers),
    )


# FLAP's structures by name (PruneConfig.structure); the *-MM ones also take remove_heads
STRUCTURES = {"UL-UM": uniform, "UL-MM": uniform_manual, "AL-MM": adaptive_manual, "AL-AM": adaptive}
MANUAL_STRUCTURES = ("UL-MM", "AL-MM")
UNIFORM_STRUCTURES = ("UL-UM", "UL-MM")  # every layer keeps the same widths


def aligned_count(k: int, n: int, multiple: int) -> int:
    """k rounded to the nearest multiple (halves round up), at most n."""
    return min(n, multiple * math.floor(k / multiple + 0.5))


def align_channels(kept: torch.Tensor, scores: torch.Tensor, multiple: int) -> torch.Tensor:
    """Round the number of kept channels to the nearest multiple (halves round up), keeping the
    highest-scoring channels of the layer; sorted indices."""
    k, n = kept.numel(), scores.numel()
    target = aligned_count(k, n, multiple)
    if target == k:
        return kept
    order = torch.sort(scores.cpu(), descending=True, stable=True).indices
    return torch.sort(order[:target]).values
