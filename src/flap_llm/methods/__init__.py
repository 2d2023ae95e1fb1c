"""Pruning methods by name (PruneConfig.method): each is (job, dense statistics or None) -> (plan, statistics).

FLAP (flap.py) is the paper's method and the default; wanda-sp and mag-sp (baselines.py) are the paper's
baselines; obs (obs.py) chooses units by what the least-squares refit can rebuild; job.py holds what every
pass of a run shares. Their names and options live in config.py, which imports none of them.
"""

from __future__ import annotations

from ..config import METHODS as NAMES
from .baselines import prune_magnitude, prune_wanda_sp
from .flap import prune_flap
from .obs import prune_obs

METHODS = {"flap": prune_flap, "obs": prune_obs, "wanda-sp": prune_wanda_sp, "mag-sp": prune_magnitude}
assert tuple(METHODS) == NAMES, "config.METHODS and the implementations must name the same methods"
