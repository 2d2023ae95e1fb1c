"""torch.distributed support: calibration windows are split across ranks and the mergeable statistics
(float64 sums) are all-reduced, so every rank makes the same plan. Works with gloo (CPU) and nccl (GPU)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from ..errors import FlapError


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def shard(windows: torch.Tensor) -> torch.Tensor:
    """This rank's share of the calibration windows (every world_size-th window)."""
    if not active():
        return windows
    n, w = windows.shape[0], world_size()
    if n < w:
        raise FlapError(f"{n} calibration windows cannot be split over {w} processes; use at least {w} windows")
    return windows[rank()::w]


def all_reduce_sum_(*tensors: torch.Tensor) -> None:
    """Sum tensors over all ranks in place (a no-op in a single process)."""
    if not active():
        return
    backend = dist.get_backend()
    for t in tensors:
        if backend == "nccl" and t.device.type != "cuda":
            moved = t.cuda()
            dist.all_reduce(moved)
            t.copy_(moved.cpu())
        else:
            dist.all_reduce(t)


def _reduce_int(n: int, like: torch.Tensor, op) -> int:
    """n reduced over all ranks by `op`, on `like`'s device under nccl (n itself in a single process)."""
    if not active():
        return n
    t = torch.tensor([n], dtype=torch.int64, device=like.device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=op)
    return int(t.item())


def reduce_count(n: int, like: torch.Tensor) -> int:
    return _reduce_int(n, like, dist.ReduceOp.SUM)


def reduce_min(n: int, like: torch.Tensor) -> int:
    """The smallest n over all ranks (so that every rank takes the same branch)."""
    return _reduce_int(n, like, dist.ReduceOp.MIN)


def init_from_env(device: str) -> bool:
    """Join the process group torchrun describes in the environment; True when there is one."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or active():
        return active()
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend=backend)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return True
