"""The checkpoint formats by name (`save_pruned(format=...)`, `--export`); one line per format."""

from __future__ import annotations

from ..errors import FlapError
from .base import CheckpointFormat
from .flap_format import FlapFormat
from .uniform import UniformFormat
from .vllm_format import VllmFormat

FORMATS: dict[str, CheckpointFormat] = {f.name: f for f in (FlapFormat(), UniformFormat(), VllmFormat())}


def get_format(name: str) -> CheckpointFormat:
    if name not in FORMATS:
        raise FlapError(f"unknown checkpoint format {name!r}; choose one of: {', '.join(FORMATS)}")
    return FORMATS[name]
