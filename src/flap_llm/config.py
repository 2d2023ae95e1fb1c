"""The pruning configuration: what every method shares (ratio, method, mode, align) and one frozen options class
per method that holds only the options that apply to it, each validated on construction.

    PruneConfig(ratio=0.5)                                                     # FLAP, the paper (the default)
    PruneConfig(ratio=0.5, options=FlapOptions(compensation="lsq"))           # FLAP + least-squares refit
    PruneConfig(ratio=0.5, method="obs")                                       # obs with its defaults
    PruneConfig(ratio=0.5, method="obs", options=ObsOptions(allocation="measured"))

The flat keywords of 0.1 (`PruneConfig(ratio=0.5, compensation="lsq")`, `metric=`, `structure=`, `lsq_damp=`,
`sequential=`, `allocation=`, ...) still work: they fill the method's options. Options of 0.1 that were deleted
(measured worse, or internal) are refused with the reason, except where they hold the value that is now fixed.

This module imports no method: the methods read their options from here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from .errors import FlapError
from .metrics import FLUCTUATION_METRICS
from .select import MANUAL_STRUCTURES, STRUCTURES

METHODS = ("flap", "obs", "wanda-sp", "mag-sp")  # methods/__init__.py maps each name to its implementation
DATA_FREE = ("mag-sp",)  # methods that score weights alone and need no calibration data
COMPENSATIONS = ("bias", "lsq", "none")  # FLAP's: the paper's bias, the least-squares refit, or none
MODES = ("prune", "mask")
LSQ_DAMP = 0.01  # the least-squares ridge of FLAP + lsq (as a fraction of the mean input variance)
OBS_DAMP = 0.1  # obs's: chosen by the refit's error on validation windows of the calibration text
ALLOCATIONS = ("held-out", "measured")  # obs's: refit errors scored on held-out windows, or on the fitted ones
ALLOCATION = "held-out"


def _check_choice(name: str, value: str, choices) -> None:
    if value not in choices:
        raise FlapError(f"unknown {name} {value!r}; choose one of: {', '.join(choices)}")


def _check_ridge(name: str, value) -> None:
    """A ridge is a positive number (a fraction of the mean input variance)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise FlapError(f"{name} must be positive (a fraction such as 0.01), got {value!r}")


class _Options:
    """What the per-method option classes share: a dict of what applies, and a readable repr."""

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict) -> "_Options":
        return cls(**{k: v for k, v in data.items() if k in {f.name for f in fields(cls)}})


@dataclass(frozen=True)
class FlapOptions(_Options):
    """FLAP's options (the paper).

    metric: the fluctuation metric, "WIFV" (default), "IFV" or "WIFN".
    structure: how units are allotted to layers and modules: "AL-AM" (default, adaptive), "UL-UM", "UL-MM",
        "AL-MM"; the *-MM structures need `remove_heads` (KV groups to remove over all layers).
    compensation: "bias" (the paper's), "lsq" (least-squares refit of the kept columns) or "none".
    lsq_damp: with "lsq": the refit's ridge as a fraction of the mean input variance (default 0.01).
    sequential: with "lsq": take the refit's statistics from the already pruned earlier layers (default off).
    """

    metric: str = "WIFV"
    structure: str = "AL-AM"
    remove_heads: int | None = None
    compensation: str = "bias"
    lsq_damp: float | None = None
    sequential: bool | None = None

    def __post_init__(self) -> None:
        _check_choice("metric", self.metric, FLUCTUATION_METRICS)
        _check_choice("structure", self.structure, STRUCTURES)
        _check_choice("compensation", self.compensation, COMPENSATIONS)
        if self.structure in MANUAL_STRUCTURES and self.remove_heads is None:
            raise FlapError(f"structure {self.structure} needs remove_heads (total KV groups to remove)")
        if self.remove_heads is not None:
            if self.structure not in MANUAL_STRUCTURES:
                raise FlapError(f"remove_heads goes with structure UL-MM or AL-MM; {self.structure} sets its own")
            if isinstance(self.remove_heads, bool) or not isinstance(self.remove_heads, int) or self.remove_heads < 0:
                raise FlapError(f"remove_heads must be a non-negative integer, got {self.remove_heads!r}")
        if self.compensation != "lsq":
            if self.lsq_damp is not None or self.sequential:
                raise FlapError(f"lsq_damp and sequential are options of compensation lsq, not {self.compensation}")
            object.__setattr__(self, "sequential", None)
            return
        if self.lsq_damp is None:
            object.__setattr__(self, "lsq_damp", LSQ_DAMP)
        _check_ridge("lsq_damp", self.lsq_damp)
        if self.sequential is None:
            object.__setattr__(self, "sequential", False)
        if not isinstance(self.sequential, bool):
            raise FlapError(f"sequential must be True or False, got {self.sequential!r}")


@dataclass(frozen=True)
class ObsOptions(_Options):
    """obs's options (methods/obs.py).

    allocation: how many units each layer and module gives up: "held-out" (default: each module's Fisher-weighted
        refit error against its width, scored on the half of the windows each refit was not fitted on) or
        "measured" (scored on the windows fitted: faster, a little worse).
    lsq_damp: the refit's ridge as a fraction of the mean input variance (default 0.1; with many calibration
        windows 0.01 can do better).
    """

    allocation: str = ALLOCATION
    lsq_damp: float = OBS_DAMP

    def __post_init__(self) -> None:
        _check_choice("allocation", self.allocation, ALLOCATIONS)
        _check_ridge("lsq_damp", self.lsq_damp)


OPTIONS = {"flap": FlapOptions, "obs": ObsOptions}  # methods without options take none
_FLAP_KEYS = {f.name for f in fields(FlapOptions)}
_OBS_KEYS = {f.name for f in fields(ObsOptions)}
# 0.1's obs options that are gone: the value each now has (accepted, and ignored), and why it went
_OBS_GONE = {
    "selection": ("obs", "FLAP's order within obs was an ablation that measured worse"),
    "sequential": (True, "obs always takes its refit's statistics from the pruned earlier layers (it measured better)"),
    "fisher_fraction": (None, "obs's Fisher share is internal now"),
    "select_damp": (None, "obs's greedy ridge is internal now"),
    "token_windows": (0, "per-token Fisher factors measured worse and were deleted"),
    "token_shrink": (None, "per-token Fisher factors measured worse and were deleted"),
    "token_reference": (None, "per-token Fisher factors measured worse and were deleted"),
}


def _options_of(method: str, legacy: dict, lenient: bool = False):
    """The method's options from 0.1's flat keywords (None values are unset). `lenient` (reading a saved
    config): keywords of deleted options, and FLAP's keywords on another method, are dropped."""
    given = {k: v for k, v in legacy.items() if v is not None}
    if method == "flap":
        unknown = set(given) - _FLAP_KEYS
        if unknown and not lenient:
            raise FlapError(f"{', '.join(sorted(unknown))}: not an option of method flap (FlapOptions takes "
                            f"{', '.join(sorted(_FLAP_KEYS))})")
        return FlapOptions(**{k: v for k, v in given.items() if k in _FLAP_KEYS})
    if method == "obs":
        opts = {}
        for key, value in given.items():
            if key in _OBS_KEYS:
                if key == "allocation" and value == "structure" and lenient:
                    continue  # a saved ablation: its plan is data and re-applies; the option is gone
                opts[key] = value
            elif key in _OBS_GONE:
                fixed, why = _OBS_GONE[key]
                if not (lenient or (fixed is not None and value == fixed)):
                    raise FlapError(f"{key} is no longer an option of method obs: {why}; use "
                                    "PruneConfig(method='obs', options=ObsOptions(...)) with allocation, lsq_damp")
            elif key == "compensation" and value in ("bias", "lsq"):
                continue  # obs always refits by least squares
            elif not lenient:
                raise FlapError(f"{key} is not an option of method obs; obs always refits by least squares and "
                                f"splits the budget by measured errors (ObsOptions takes {', '.join(sorted(_OBS_KEYS))})")
        return ObsOptions(**opts)
    if given and not lenient:
        raise FlapError(f"method {method} has no options (got {', '.join(sorted(given))})")
    return None


@dataclass(frozen=True, init=False)
class PruneConfig:
    """What to prune and how.

    ratio: fraction of the decoder's attention+MLP weight parameters to remove, in [0, 1).
    method: "flap" (the paper, the default); "obs" (structured OBS selection with the least-squares refit and an
        allocation by measured errors: methods/obs.py); or the baselines "wanda-sp" and "mag-sp" (uniform, no
        compensation).
    options: the method's options, FlapOptions or ObsOptions (None: the method's defaults; the baselines have
        none). 0.1's flat keywords (metric=, structure=, remove_heads=, compensation=, lsq_damp=, sequential=,
        allocation=) fill them.
    mode: "prune" shrinks the weight matrices; "mask" zeroes them and keeps shapes.
    align: round each layer's kept MLP channels to the nearest multiple of this (by score), e.g. 64 or 128 for
        GPU tensor cores, 256 for llama.cpp's k-quants; None (default) keeps the exact plan.
    """

    ratio: float
    method: str
    options: FlapOptions | ObsOptions | None
    mode: str
    align: int | None

    def __init__(self, ratio: float = 0.2, method: str = "flap", options: FlapOptions | ObsOptions | None = None,
                 mode: str = "prune", align: int | None = None, **legacy) -> None:
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
            raise FlapError(f"ratio must be a number in [0, 1), got {ratio!r}")
        if not 0.0 <= float(ratio) < 1.0:
            raise FlapError(f"ratio must be in [0, 1) (the fraction of parameters to remove), got {ratio}")
        _check_choice("method", method, METHODS)
        _check_choice("mode", mode, MODES)
        if align is not None and (isinstance(align, bool) or not isinstance(align, int) or align < 1):
            raise FlapError(f"align must be a positive integer (e.g. 64) or None, got {align!r}")
        lenient = legacy.pop("_lenient", False)
        if options is None:
            options = _options_of(method, legacy, lenient)
        elif any(v is not None for v in legacy.values()):
            raise FlapError(f"give either options= or the flat keywords ({', '.join(sorted(legacy))}), not both")
        want = OPTIONS.get(method)
        if want is None and options is not None:
            raise FlapError(f"method {method} has no options; drop options=")
        if want is not None and not isinstance(options, want):
            raise FlapError(f"method {method} takes {want.__name__}, got {type(options).__name__}")
        for name, value in (("ratio", ratio), ("method", method), ("options", options), ("mode", mode),
                            ("align", align)):
            object.__setattr__(self, name, value)

    @property
    def effective_compensation(self) -> str:
        """Baselines never compensate (as in the paper); FLAP uses its compensation; obs always refits by least
        squares."""
        if self.method == "obs":
            return "lsq"
        return self.options.compensation if self.method == "flap" else "none"

    @property
    def label(self) -> str:
        """The method and what shapes its plan, for messages and plot titles."""
        if self.method == "obs":
            return f"obs, {self.options.allocation} allocation"
        if self.method == "flap":
            lsq = ", lsq" if self.options.compensation == "lsq" else ""
            return f"flap, {self.options.structure}, {self.options.metric}{lsq}"
        return self.method

    @property
    def needs_data(self) -> bool:
        return self.method not in DATA_FREE

    def to_dict(self) -> dict:
        """Only what applies: the shared fields, and the method's options (None for the baselines)."""
        return {"ratio": self.ratio, "method": self.method,
                "options": None if self.options is None else self.options.to_dict(), "mode": self.mode,
                "align": self.align}

    @classmethod
    def from_dict(cls, data: dict) -> "PruneConfig":
        """A config saved by to_dict, or by 0.1 (flat keys, some of them options since deleted)."""
        shared = {k: data[k] for k in ("ratio", "method", "mode", "align") if k in data}
        method = shared.get("method", "flap")
        if isinstance(data.get("options"), dict):
            want = OPTIONS.get(method)
            return cls(**shared, options=None if want is None else want.from_dict(data["options"]))
        legacy = {k: v for k, v in data.items() if k not in shared and k != "options"}
        return cls(**shared, **legacy, _lenient=True)
