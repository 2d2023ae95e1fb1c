"""The pruning configuration: one frozen dataclass, validated on construction."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .errors import FlapError
from .methods.flap import COMPENSATIONS
from .methods import ALLOCATIONS, DATA_FREE, METHODS, SELECTIONS
from .metrics import FLUCTUATION_METRICS
from .select import MANUAL_STRUCTURES, STRUCTURES

MODES = ("prune", "mask")
LSQ_DAMP = 0.01  # the least-squares ridge of FLAP + lsq (as a fraction of the mean input variance)
OBS_DAMP = 0.1  # obs's: chosen by the refit's error on validation windows of the calibration text
ALLOCATION = "held-out"  # obs's default allocation ("measured" before it: older configs record that)
FISHER_FRACTION = 0.5  # obs: the share of calibration windows whose backward pass estimates the output Fisher
# obs's greedy choice of units: a smaller ridge than its refit's chose better units on both models and every ratio
# measured (BENCHMARKS.md, "Other calibration draws"); configs saved before it chose at their lsq_damp
SELECT_DAMP = 0.01


def _check_choice(name: str, value: str, choices) -> None:
    if value not in choices:
        raise FlapError(f"unknown {name} {value!r}; choose one of: {', '.join(choices)}")


def _check_ridge(name: str, value, none_means: str) -> None:
    """A ridge is a positive number (a fraction of the mean input variance)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise FlapError(f"{name} must be positive (a fraction such as 0.01; None: {none_means}), got {value!r}")


@dataclass(frozen=True)
class PruneConfig:
    """What to prune and how.

    ratio: fraction of the decoder's attention+MLP weight parameters to remove, in [0, 1).
    method: "flap" (the paper, the default); "obs" (structured OBS selection, allocation by held-out refit
        errors and the least-squares refit: see methods/obs.py); or the baselines "wanda-sp" and "mag-sp" (uniform, no
        compensation).
    metric: FLAP's fluctuation metric, "WIFV" (default), "IFV" or "WIFN".
    structure: how units are allotted to layers and modules; "AL-AM" (default, adaptive) or
        "UL-UM", "UL-MM", "AL-MM". The *-MM structures need `remove_heads`.
    remove_heads: total KV groups to remove over all layers, for UL-MM and AL-MM.
    compensation: "bias" (FLAP's mean compensation), "lsq" (least-squares refit of the kept
        columns), or "none".
    mode: "prune" shrinks the weight matrices; "mask" zeroes them and keeps shapes.
    lsq_damp: damping (ridge) of the least-squares solve, as a fraction of the mean diagonal of C_KK; None
        (default) means the method's: 0.01 for FLAP's lsq, 0.1 for obs (its refit, removal paths and
        allocation all read off calibration errors, and a larger ridge made them carry over better to other
        windows of the same text: benchmarks/refit_generalization.py).
    sequential: for lsq and obs, take the second-pass statistics from the already-pruned earlier layers;
        None (default) means on for obs (it measured better there), off otherwise.
    selection: obs only: which units go within a module: "obs" (greedy, by the refit error they leave) or
        "metric" (FLAP's `metric` order).
    allocation: obs only: how many units each layer and module gives up: "held-out" (default: each module's
        refit error against its width, weighed by the output Fisher, with each refit scored on the half of the
        windows it was not fitted on, both ways round, split under the budget), "measured" (the same scored on
        the windows each refit was fitted on: cheaper, but those errors flatter wide projections for fitting
        their own windows) or "structure" (FLAP's `structure` on FLAP's scores).
    fisher_fraction: obs only: the share of the calibration windows (each drawn by a hash of its tokens)
        whose backward pass estimates the output Fisher; the others still give the covariances. Less is
        faster (the backward and the vocabulary projection are most of obs's first pass on small models) and
        noisier. None (default): FISHER_FRACTION.
    select_damp: obs only: the ridge of the refit pass's greedy choice of units (as `lsq_damp`, a fraction of
        the mean diagonal of C_KK); the refit of the kept columns and the allocation's curves keep `lsq_damp`.
        None (default): SELECT_DAMP (0.01; configs saved before the option had one ridge for both).
    align: round each layer's kept MLP channels to the nearest multiple of this (by score), e.g. 64 or
        128 for GPU tensor cores; None (default) keeps the exact plan.
    """

    ratio: float = 0.2
    method: str = "flap"
    metric: str = "WIFV"
    structure: str = "AL-AM"
    remove_heads: int | None = None
    compensation: str = "bias"
    mode: str = "prune"
    lsq_damp: float | None = None
    sequential: bool | None = None
    align: int | None = None
    selection: str = "obs"
    allocation: str = ALLOCATION
    fisher_fraction: float | None = None
    select_damp: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)):
            raise FlapError(f"ratio must be a number in [0, 1), got {self.ratio!r}")
        if not 0.0 <= float(self.ratio) < 1.0:
            raise FlapError(f"ratio must be in [0, 1) (the fraction of parameters to remove), got {self.ratio}")
        _check_choice("method", self.method, METHODS)
        _check_choice("metric", self.metric, FLUCTUATION_METRICS)
        _check_choice("structure", self.structure, STRUCTURES)
        _check_choice("compensation", self.compensation, COMPENSATIONS)
        _check_choice("mode", self.mode, MODES)
        if self.sequential is None:  # the method's default, resolved once so reports and checkpoints record it
            object.__setattr__(self, "sequential", self.method == "obs")
        if not isinstance(self.sequential, bool):
            raise FlapError(f"sequential must be True, False or None (the method's default), got {self.sequential!r}")
        _check_choice("selection", self.selection, SELECTIONS)
        _check_choice("allocation", self.allocation, ALLOCATIONS)
        if self.method != "obs" and (self.selection != "obs" or self.allocation not in (ALLOCATION, "measured")):
            raise FlapError(f"selection and allocation are options of method obs; method {self.method} has its own")
        if self.method != "obs":
            if self.fisher_fraction is not None:
                raise FlapError(f"fisher_fraction is an option of method obs; method {self.method} has no Fisher pass")
        else:
            if self.fisher_fraction is None:
                object.__setattr__(self, "fisher_fraction", FISHER_FRACTION)
            if (isinstance(self.fisher_fraction, bool) or not isinstance(self.fisher_fraction, (int, float))
                    or not 0 < self.fisher_fraction <= 1):
                raise FlapError(f"fisher_fraction must be in (0, 1] (None: obs's default), got {self.fisher_fraction!r}")
        if self.method == "obs" and self.compensation not in ("bias", "lsq"):
            raise FlapError("method obs always refits the kept columns by least squares; leave compensation unset")
        uses_structure = self.method == "flap" or (self.method == "obs" and self.allocation == "structure")
        if uses_structure and self.structure in MANUAL_STRUCTURES:
            if self.remove_heads is None:
                raise FlapError(f"structure {self.structure} needs remove_heads (total KV groups to remove)")
        if self.remove_heads is not None:
            if isinstance(self.remove_heads, bool) or not isinstance(self.remove_heads, int) or self.remove_heads < 0:
                raise FlapError(f"remove_heads must be a non-negative integer, got {self.remove_heads!r}")
        if self.align is not None and (isinstance(self.align, bool) or not isinstance(self.align, int) or self.align < 1):
            raise FlapError(f"align must be a positive integer (e.g. 64) or None, got {self.align!r}")
        if self.lsq_damp is None:
            object.__setattr__(self, "lsq_damp", OBS_DAMP if self.method == "obs" else LSQ_DAMP)
        _check_ridge("lsq_damp", self.lsq_damp, "the method's default")
        if self.method != "obs":
            if self.select_damp is not None:
                raise FlapError(f"select_damp is an option of method obs; method {self.method} has no greedy selection")
        else:
            if self.select_damp is None:
                object.__setattr__(self, "select_damp", SELECT_DAMP)
            _check_ridge("select_damp", self.select_damp, f"obs's default, {SELECT_DAMP}")

    @property
    def effective_compensation(self) -> str:
        """Baselines never compensate (as in the paper); FLAP uses the configured compensation; obs always
        refits by least squares."""
        if self.method == "obs":
            return "lsq"
        return self.compensation if self.method == "flap" else "none"

    @property
    def label(self) -> str:
        """The method and what shapes its plan, for messages and plot titles."""
        if self.method == "obs":
            alloc = {"measured": "measured allocation", "held-out": "held-out allocation"}.get(self.allocation,
                                                                                               self.structure)
            return f"obs, {self.selection} selection, {alloc}"
        if self.method == "flap":
            return f"flap, {self.structure}, {self.metric}"
        return self.method

    @property
    def needs_backward(self) -> bool:
        """obs weighs its errors by the output Fisher: one backward pass of the whole model in memory."""
        return self.method == "obs" and (self.selection, self.allocation) != ("metric", "structure")

    @property
    def needs_data(self) -> bool:
        return self.method not in DATA_FREE

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "PruneConfig":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        if known.get("method") == "obs":  # saved before these options existed:
            known.setdefault("fisher_fraction", 1.0)  # every window estimated the Fisher
            known.setdefault("select_damp", known.get("lsq_damp") or OBS_DAMP)  # the refit's ridge chose the units
        return cls(**known)
