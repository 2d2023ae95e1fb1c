"""flap-llm: retraining-free structured pruning of LLMs with FLAP (AAAI 2024).

The public names load on first use, so that importing one submodule (vLLM's plugin hook, flap_llm.serving) does not
import the whole library."""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "PruneConfig": "config", "FlapOptions": "methods.flap", "ObsOptions": "methods.obs", "FlapError": "errors",
    "LayerPlan": "model.plan", "PrunePlan": "model.plan", "PruneResult": "engine", "prune": "engine",
    "LayerUpdate": "model.apply", "OutputUpdate": "model.apply", "apply_plan": "model.apply",
    "PruneReport": "reporting.report", "load_pruned": "model.checkpoint", "save_pruned": "model.checkpoint",
    "save_gguf": "export", "HealConfig": "healing.distill", "HealResult": "healing.distill", "heal": "healing.distill",
}

__all__ = sorted(_PUBLIC) + ["__version__"]


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
        globals()[name] = value
        return value
    try:
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
