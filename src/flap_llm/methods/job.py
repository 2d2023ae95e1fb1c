"""What every pass of one pruning run shares, and the steps the methods have in common."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..model.apply import UpdateFn, apply_plan
from ..model.arch import ArchSpec, Dims
from ..model.plan import PrunePlan
from ..reporting.report import Timer
from ..math.select import Selection, align_channels
from ..calibration.walk import LayerProvider, walk

if TYPE_CHECKING:
    from ..config import PruneConfig


@dataclass
class Job:
    """One pruning run: the model, its table entry and shapes, the calibration batches (None without data),
    the configuration, the timer, and the layer provider every pass goes through."""

    model: nn.Module
    spec: ArchSpec
    dims: Dims
    batches: list[torch.Tensor] | None
    config: "PruneConfig"
    timer: Timer
    progress: bool
    layers: LayerProvider

    def walk(self, visit, desc: str) -> None:
        walk(self.model, self.spec, self.batches, visit, self.progress, desc, self.layers)

    def scores_of_each_layer(self, score: Callable[[int, nn.Module], tuple[torch.Tensor, torch.Tensor]]):
        """(attention scores, MLP scores) of every layer, each computed while its layer is loaded."""
        attn, mlp = [], []
        for i in range(len(self.layers)):
            with self.layers.open(i) as layer:
                a, m = score(i, layer)
            attn.append(a)
            mlp.append(m)
        return attn, mlp

    def aligned(self, sel: Selection, mlp_scores: list[torch.Tensor]) -> Selection:
        """The selection with each layer's kept MLP channels rounded to config.align (by score)."""
        if not self.config.align:
            return sel
        return Selection(sel.kept_groups,
                         [align_channels(k, s, self.config.align) for k, s in zip(sel.kept_channels, mlp_scores)])

    def plan_of(self, sel: Selection) -> PrunePlan:
        return PrunePlan.from_groups(sel.kept_groups, sel.kept_channels, self.dims)

    def apply(self, plan: PrunePlan, update: UpdateFn | None) -> None:
        """Apply the plan through the layer provider (each layer's update computed while it is loaded)."""
        apply_plan(self.model, plan, update, mode=self.config.mode, layers=self.layers)
