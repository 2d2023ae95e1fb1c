"""Pruning methods by name (PruneConfig.method): each is (job, dense statistics or None) -> (plan, statistics).

FLAP (flap.py) is the paper's method and the default; wanda-sp and mag-sp (baselines.py) are the paper's
baselines; job.py holds what every pass of a run shares.
"""

from __future__ import annotations

from .baselines import prune_magnitude, prune_wanda_sp
from .flap import prune_flap

METHODS = {"flap": prune_flap, "wanda-sp": prune_wanda_sp, "mag-sp": prune_magnitude}
# methods that score weights alone and need no calibration data
DATA_FREE = ("mag-sp",)
