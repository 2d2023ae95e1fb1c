"""flap-llm: retraining-free structured pruning of LLMs with FLAP (AAAI 2024)."""

from .config import PruneConfig
from .methods.flap import FlapOptions
from .methods.obs import ObsOptions
from .errors import FlapError
from .model.plan import LayerPlan, PrunePlan
from .engine import PruneResult, prune
from .model.apply import LayerUpdate, OutputUpdate, apply_plan
from .reporting.report import PruneReport
from .model.checkpoint import load_pruned, save_pruned
from .export import save_gguf
from .healing.distill import HealConfig, HealResult, heal

__version__ = "0.1.0"

__all__ = ["FlapError", "FlapOptions", "HealConfig", "HealResult", "LayerPlan", "LayerUpdate", "ObsOptions", "OutputUpdate", "PruneConfig", "PrunePlan", "PruneReport", "PruneResult",
           "apply_plan", "heal", "load_pruned", "prune", "save_gguf", "save_pruned", "__version__"]
