"""Pruning methods, each one module with one class (base.Method), registered by name in registry.py.

FLAP (flap.py) is the paper's method and the default; wanda-sp and mag-sp (baselines.py) are the paper's
baselines; obs (obs.py) chooses units by what the least-squares refit can rebuild; job.py holds what every
pass of a run shares. builtins.py registers them; docs/methods.md shows how to add one.
"""

from .base import Method, Options, option
from .registry import get, names, register, unregister

__all__ = ["Method", "Options", "get", "names", "option", "register", "unregister"]
