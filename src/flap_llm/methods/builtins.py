"""The methods that ship with flap-llm, one registry line each (in --method's order)."""

from .baselines import MagnitudeSP, WandaSP
from .flap import Flap
from .obs import Obs
from .registry import register

register(Flap())
register(Obs())
register(WandaSP())
register(MagnitudeSP())
