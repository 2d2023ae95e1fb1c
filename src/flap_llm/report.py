"""Parameter accounting, versions and timings for reports and manifests."""

from __future__ import annotations

import platform
import time
from contextlib import contextmanager
from importlib import metadata

from torch import nn

from .arch import ArchSpec, Dims, decoder_weight_params, model_params
from .plan import PrunePlan


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("flap-llm", "torch", "transformers", "safetensors", "lm_eval"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def planned_decoder_params(plan: PrunePlan, dims: Dims) -> int:
    """Decoder attention+MLP weight parameters that the plan keeps."""
    hd, h = dims.head_dim, dims.hidden
    return sum(2 * len(lp.heads) * hd * h + 2 * len(lp.kv_heads) * hd * h + 3 * len(lp.channels) * h
               for lp in plan.layers)


def param_report(model: nn.Module, spec: ArchSpec, dims: Dims, plan: PrunePlan,
                 decoder_before: int, model_before: int, mode: str) -> dict:
    decoder_after = planned_decoder_params(plan, dims)
    removed = decoder_before - decoder_after
    model_after = model_params(model) if mode == "prune" else model_before - removed
    if mode == "prune":
        assert decoder_weight_params(model, spec) == decoder_after
    return {
        "decoder_before": decoder_before,
        "decoder_after": decoder_after,
        "decoder_removed_fraction": removed / decoder_before,
        "model_before": model_before,
        "model_after": model_after,
        "model_removed_fraction": (model_before - model_after) / model_before,
    }


def layer_report(plan: PrunePlan, dims: Dims) -> dict:
    counts = plan.kept_counts()
    return {
        "per_layer": counts,
        "kv_groups_kept": sum(c["kv_heads"] for c in counts),
        "kv_groups_total": dims.n_layers * dims.n_kv_heads,
        "heads_kept": sum(c["heads"] for c in counts),
        "heads_total": dims.n_layers * dims.n_heads,
        "channels_kept": sum(c["channels"] for c in counts),
        "channels_total": dims.n_layers * dims.d_ff,
    }


class Timer:
    """Named wall-clock sections, in seconds."""

    def __init__(self) -> None:
        self.sections: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.sections[name] = self.sections.get(name, 0.0) + time.perf_counter() - t0
