"""The plan: which query heads, KV heads and MLP channels each layer keeps. Plain, serializable data."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .arch import Dims
from ..errors import FlapError


@dataclass(frozen=True)
class LayerPlan:
    heads: tuple[int, ...]  # kept query heads, original numbering, sorted
    kv_heads: tuple[int, ...]  # kept KV heads (= kept groups)
    channels: tuple[int, ...]  # kept MLP channels

    def to_dict(self) -> dict:
        return {"heads": list(self.heads), "kv_heads": list(self.kv_heads), "channels": list(self.channels)}


@dataclass(frozen=True)
class PrunePlan:
    layers: tuple[LayerPlan, ...]
    # whole decoder blocks removed (depth pruning), original numbering: their LayerPlans keep nothing, and the
    # pruned model has no layer for them (its layers are renumbered, its config has the new layer count)
    dropped: tuple[int, ...] = ()

    def to_dict(self) -> dict:
        out: dict = {"layers": [lp.to_dict() for lp in self.layers]}
        if self.dropped:
            out["dropped"] = list(self.dropped)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "PrunePlan":
        try:
            return cls(tuple(
                LayerPlan(tuple(map(int, d["heads"])), tuple(map(int, d["kv_heads"])), tuple(map(int, d["channels"])))
                for d in data["layers"]
            ), tuple(map(int, data.get("dropped", ()))))
        except (KeyError, TypeError, ValueError) as e:
            raise FlapError(f"not a valid plan (expected {{'layers': [{{'heads', 'kv_heads', 'channels'}}]}}): {e}") from e

    @classmethod
    def from_groups(cls, kept_groups: list[torch.Tensor], kept_channels: list[torch.Tensor], dims: Dims) -> "PrunePlan":
        g = dims.group_size
        layers = []
        for groups, channels in zip(kept_groups, kept_channels):
            kv = sorted(int(k) for k in groups)
            heads = [k * g + i for k in kv for i in range(g)]
            layers.append(LayerPlan(tuple(heads), tuple(kv), tuple(sorted(int(c) for c in channels))))
        return cls(tuple(layers))

    def validate(self, dims: Dims) -> None:
        """Check the plan fits the model and keeps whole KV groups."""
        if len(self.layers) != dims.n_layers:
            raise FlapError(f"plan has {len(self.layers)} layers, the model {dims.n_layers}")
        g = dims.group_size
        if list(self.dropped) != sorted(set(self.dropped)) or any(not 0 <= i < dims.n_layers for i in self.dropped):
            raise FlapError(f"dropped layers {list(self.dropped)} must be sorted, unique and in [0, {dims.n_layers})")
        if len(self.dropped) >= dims.n_layers:
            raise FlapError("a plan must keep at least one decoder layer")
        for i in self.dropped:
            if self.layers[i].heads or self.layers[i].channels:
                raise FlapError(f"layer {i} is dropped, so its plan must keep no heads and no channels")
        for i, lp in enumerate(self.layers):
            expected = [k * g + j for k in lp.kv_heads for j in range(g)]
            if list(lp.heads) != expected:
                raise FlapError(f"layer {i}: kept heads {list(lp.heads)} are not the whole groups of kv_heads {list(lp.kv_heads)}")
            for name, idx, n in (("kv_heads", lp.kv_heads, dims.n_kv_heads), ("channels", lp.channels, dims.d_ff)):
                if list(idx) != sorted(set(idx)) or (idx and not (0 <= idx[0] and idx[-1] < n)):
                    raise FlapError(f"layer {i}: {name} must be sorted, unique and in [0, {n})")

    def kept_counts(self) -> list[dict]:
        return [{"heads": len(lp.heads), "kv_heads": len(lp.kv_heads), "channels": len(lp.channels)} for lp in self.layers]
