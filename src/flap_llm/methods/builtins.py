"""The methods that ship with flap-llm, one line each, in --method's order (registry.py loads them first)."""

from .baselines import MagnitudeSP, WandaSP
from .depth import Depth
from .flap import Flap
from .obs import Obs

BUILTINS = (
    Flap(),
    Obs(),
    WandaSP(),
    MagnitudeSP(),
    Depth(),
)
