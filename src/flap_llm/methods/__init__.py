"""Pruning methods by name (PruneConfig.method): each is (job, dense statistics or None) -> (plan, statistics).

FLAP (flap.py) is the paper's method and the default; wanda-sp and mag-sp (baselines.py) are the paper's
baselines; obs (obs.py) chooses units by what the least-squares refit can rebuild; job.py holds what every
pass of a run shares.
"""

from __future__ import annotations

from .baselines import prune_magnitude, prune_wanda_sp
from .flap import prune_flap
from .obs import prune_obs

METHODS = {"flap": prune_flap, "obs": prune_obs, "wanda-sp": prune_wanda_sp, "mag-sp": prune_magnitude}
# methods that score weights alone and need no calibration data
DATA_FREE = ("mag-sp",)
# obs's options (PruneConfig.selection / .allocation)
SELECTIONS = ("obs", "metric")
ALLOCATIONS = ("measured", "held-out", "structure")
