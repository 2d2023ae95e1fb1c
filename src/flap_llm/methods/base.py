"""What a pruning method is to the rest of flap-llm: one class, registered by name.

A method declares its name, its options (one frozen dataclass whose fields carry their help text and choices:
the command line builds its flags from them), whether it needs calibration data, the architectures it refuses
and why, its memory cost for the dry run, its label, and its run. Nothing outside methods/ names a method: the
config, the command line, the dry run, the engine and the report ask the registry (registry.py).
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, field, fields
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import FlapError

if TYPE_CHECKING:
    from ..reporting.estimate import Cost, CostInputs
    from ..model.plan import PrunePlan
    from ..math.stats import LayerStats
    from .job import Job


def option(default: Any = None, *, help: str, choices: tuple | None = None, flag: str | None = None) -> Any:
    """A field of a method's options: its default, the help text its command-line flag shows and, where the
    value is one of a few, the choices (checked on construction). `flag` names the flag when it is not
    --<field-name>."""
    return field(default=default, metadata={"help": help, "choices": choices, "flag": flag})


def check_choice(name: str, value: str, choices) -> None:
    if value not in choices:
        raise FlapError(f"unknown {name} {value!r}; choose one of: {', '.join(choices)}")


def check_ridge(name: str, value) -> None:
    """A ridge is a positive number (a fraction of the mean input variance)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise FlapError(f"{name} must be positive (a fraction such as 0.01), got {value!r}")


class Options:
    """What every method's options class shares (each is a frozen dataclass built from `option` fields): the
    choices are checked on construction, it serializes as a dict of what applies, and reads that dict back."""

    def __post_init__(self) -> None:
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices is not None:
                check_choice(f.name.replace("_", " "), getattr(self, f.name), choices)
        self.validate()

    def validate(self) -> None:
        """Checks across fields (a method's own rules); the default has none."""

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict) -> "Options":
        return cls(**{k: v for k, v in data.items() if k in {f.name for f in fields(cls)}})

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}

    @classmethod
    def flags(cls) -> list[dict]:
        """Each field as a command-line flag: name, flag, help, choices, type, default (for the help text)."""
        out = []
        for f in fields(cls):
            kind = f.type if isinstance(f.type, type) else str(f.type)
            out.append({"name": f.name, "flag": f.metadata.get("flag") or "--" + f.name.replace("_", "-"),
                        "help": f.metadata.get("help", ""), "choices": f.metadata.get("choices"),
                        "type": kind, "default": None if f.default is MISSING else f.default})
        return out


class Method:
    """A pruning method. Subclasses set the class attributes and implement `run`; registry.register(Cls())
    makes it a --method choice."""

    name: ClassVar[str]
    summary: ClassVar[str]  # one line for --method's help
    options: ClassVar[type[Options] | None] = None  # None: the method takes no options
    needs_data: ClassVar[bool] = True  # False: it scores weights alone (no calibration windows)
    streams: ClassVar[bool] = True  # False: it needs the whole model in memory (no --offload)
    widths: ClassVar[bool] = True  # False: kept layers keep their dense widths (nothing for --align to round)
    uses_statistics: ClassVar[bool] = False  # accepts FLAP's dense statistics of an earlier run (prune(statistics=))
    refused: ClassVar[dict[str, str]] = {}  # architecture -> why the method is not offered for it
    instead: ClassVar[str] = ""  # what to use where it is refused

    def run(self, job: "Job", statistics: "list[LayerStats] | None") -> "tuple[PrunePlan, list[LayerStats] | None]":
        raise NotImplementedError

    def default_options(self) -> Options | None:
        return None if self.options is None else self.options()

    def compensation(self, options: Options | None) -> str:
        """How the removed units' contribution is repaired, for the report: "bias", "lsq" or "none"."""
        return "none"

    def label(self, options: Options | None) -> str:
        """The method and what shapes its plan, for messages and plot titles."""
        return self.name

    def uniform(self, options: Options | None) -> bool:
        """Whether every layer keeps the same widths (a stock architecture can hold the result)."""
        return False

    def cost(self, inputs: "CostInputs", options: Options | None) -> "Cost":
        """Memory and passes beyond the shared calibration walk, for the dry run (estimate.py)."""
        from ..reporting.estimate import Cost
        return Cost()

    def refusal(self, architecture: str) -> str | None:
        """The one-line reason this method is not offered for `architecture` (None: it is)."""
        why = self.refused.get(architecture)
        if why is None:
            return None
        return f"method {self.name} is not offered for {architecture}: {why}" + (f"; {self.instead}" if self.instead
                                                                                  else "")

