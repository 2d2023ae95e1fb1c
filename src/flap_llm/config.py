"""The pruning configuration: what every method shares (ratio, method, mode, align) and the chosen method's
options object (each method declares its own, in its module under methods/; validated on construction).

    PruneConfig(ratio=0.5)                                   # FLAP, the paper (the default)
    PruneConfig(ratio=0.5, method=NAME, options=OPTIONS)    # any registered method, with its own options object

The flat keywords of 0.1 (`PruneConfig(ratio=0.5, compensation="lsq")`, `metric=`, `structure=`, `lsq_damp=`,
`sequential=`, `allocation=`, ...) still work through compat.py: they fill the method's options.

This module names no method: it asks the registry (methods/registry.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from .compat import options_from_keywords
from .errors import FlapError
from .methods import registry
from .methods.base import Options, check_choice

MODES = ("prune", "mask")


@dataclass(frozen=True, init=False)
class PruneConfig:
    """What to prune and how.

    ratio: fraction of the decoder's attention+MLP weight parameters to remove, in [0, 1).
    method: a registered method's name (methods.names()): flap (the paper, the default), obs, the baselines
        wanda-sp and mag-sp, or one of your own (methods.register).
    options: the method's options object (None: the method's defaults; a method may have none). 0.1's flat
        keywords (metric=, structure=, remove_heads=, compensation=, lsq_damp=, sequential=, allocation=) fill
        them.
    mode: "prune" shrinks the weight matrices; "mask" zeroes them and keeps shapes.
    align: round each layer's kept MLP channels to the nearest multiple of this (by score), e.g. 64 or 128 for
        GPU tensor cores, 256 for llama.cpp's k-quants; None (default) keeps the exact plan.
    """

    ratio: float
    method: str
    options: Options | None
    mode: str
    align: int | None

    def __init__(self, ratio: float = 0.2, method: str = registry.DEFAULT, options: Options | None = None,
                 mode: str = "prune", align: int | None = None, **legacy) -> None:
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
            raise FlapError(f"ratio must be a number in [0, 1), got {ratio!r}")
        if not 0.0 <= float(ratio) < 1.0:
            raise FlapError(f"ratio must be in [0, 1) (the fraction of parameters to remove), got {ratio}")
        impl = registry.get(method)
        check_choice("mode", mode, MODES)
        if align is not None and (isinstance(align, bool) or not isinstance(align, int) or align < 1):
            raise FlapError(f"align must be a positive integer (e.g. 64) or None, got {align!r}")
        lenient = legacy.pop("_lenient", False)
        if options is None:
            options = options_from_keywords(impl, legacy, lenient)
        elif any(v is not None for v in legacy.values()):
            raise FlapError(f"give either options= or the flat keywords ({', '.join(sorted(legacy))}), not both")
        want = impl.options
        if want is None and options is not None:
            raise FlapError(f"method {method} has no options; drop options=")
        if want is not None and not isinstance(options, want):
            raise FlapError(f"method {method} takes {want.__name__}, got {type(options).__name__}")
        for name, value in (("ratio", ratio), ("method", method), ("options", options), ("mode", mode),
                            ("align", align)):
            object.__setattr__(self, name, value)

    @property
    def effective_compensation(self) -> str:
        """How the method repairs what it removes ("bias", "lsq" or "none"; the baselines never do)."""
        return registry.get(self.method).compensation(self.options)

    @property
    def label(self) -> str:
        """The method and what shapes its plan, for messages and plot titles."""
        return registry.get(self.method).label(self.options)

    @property
    def needs_data(self) -> bool:
        return registry.get(self.method).needs_data

    @property
    def uniform(self) -> bool:
        """Whether the plan keeps the same widths in every layer (a stock architecture can hold it)."""
        return registry.get(self.method).uniform(self.options)

    def to_dict(self) -> dict:
        """Only what applies: the shared fields, and the method's options (None for a method without)."""
        return {"ratio": self.ratio, "method": self.method,
                "options": None if self.options is None else self.options.to_dict(), "mode": self.mode,
                "align": self.align}

    @classmethod
    def from_dict(cls, data: dict) -> "PruneConfig":
        """A config saved by to_dict, or by 0.1 (flat keys, some of them options since deleted)."""
        shared = {k: data[k] for k in ("ratio", "method", "mode", "align") if k in data}
        method = shared.get("method", registry.DEFAULT)
        if isinstance(data.get("options"), dict):
            want = registry.get(method).options
            return cls(**shared, options=None if want is None else want.from_dict(data["options"]))
        legacy = {k: v for k, v in data.items() if k not in shared and k != "options"}
        return cls(**shared, **legacy, _lenient=True)
