"""Devices and dtypes by name, as the CLI and the loaders take them."""

from __future__ import annotations

import re

import torch

from ..errors import FlapError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype) or name == "auto":
        return None if name == "auto" else name
    if not isinstance(name, str) or name not in DTYPES:
        raise FlapError(f"unknown dtype {name!r}; choose one of: auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def check_device(name: str) -> None:
    """A device we can use: cpu, or cuda / cuda:N when that GPU exists here."""
    if name == "cpu":
        return
    m = re.fullmatch(r"cuda(?::(\d+))?", name)
    if m is None:
        raise FlapError(f"unknown device {name!r}; use cpu, cuda (or cuda:N) or auto")
    if not torch.cuda.is_available():
        raise FlapError(f"device {name} was asked for but there is no CUDA GPU here; use cpu")
    if m.group(1) is not None and int(m.group(1)) >= torch.cuda.device_count():
        raise FlapError(f"device {name} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")


def pick_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    check_device(name)
    return name


def available_bytes(device: torch.device) -> int | None:
    """Memory available for new tensors on `device`: free CUDA memory, or Linux's MemAvailable for the CPU;
    None where it cannot be read."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
