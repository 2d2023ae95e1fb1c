"""depth: remove whole decoder blocks. The result is the model's own architecture with fewer layers (every kept
layer keeps its dense widths), which every engine runs; llama.cpp and vLLM run it as the stock model.

How many blocks: `ratio` of the decoder's weight parameters, rounded to whole blocks (every block holds the same
number), so the report's `decoder_removed_fraction` is the exact fraction removed.

Which blocks: the calibration loss (next-token cross-entropy) of the model with each block removed on its own,
on the first LOSS_WINDOWS calibration windows (one forward pass per block); the blocks whose removal costs least
go. (The angular distance between a span's input and output, one pass, was measured against it and removed:
docs/depth.md.)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..calibration import distributed
from ..errors import FlapError
from ..model.plan import LayerPlan, PrunePlan
from .base import Method
from .job import Job

# The loss score runs one pass per block over this many calibration windows (8,192 tokens at 128): about as many
# token-passes as FLAP's one walk over its 1,024 windows takes, for a 16-to-32-layer model.
LOSS_WINDOWS = 64


def blocks_to_remove(ratio: float, n_layers: int) -> int:
    """Whole blocks for `ratio` of the decoder's parameters: the nearest count, at least one for a positive ratio,
    and never every block."""
    k = math.floor(ratio * n_layers + 0.5)
    if ratio > 0 and k == 0:
        k = 1
    if k >= n_layers:
        raise FlapError(f"ratio {ratio} would remove all {n_layers} blocks; give a smaller ratio")
    return k


def _hidden(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _loss(job: Job) -> float:
    """Mean next-token loss over the first windows (under torch.distributed: each rank's first windows of its
    share, summed over the ranks, so every rank chooses the same blocks)."""
    total = torch.zeros(2, dtype=torch.float64, device=job.model.device)
    for batch in _first_windows(job.batches, LOSS_WINDOWS // distributed.world_size()):
        ids = batch.to(job.model.device)
        logits = job.model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        total[0] += F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").double()
        total[1] += ids[:, 1:].numel()
    if distributed.active():
        distributed.all_reduce_sum_(total)
    return float(total[0] / total[1])


def _first_windows(batches: list[torch.Tensor], n: int) -> list[torch.Tensor]:
    out, left = [], n
    for b in batches:
        if left <= 0:
            break
        out.append(b[:left])
        left -= out[-1].shape[0]
    return out


def loss_without_each(job: Job) -> list[float]:
    """The calibration loss (mean next-token cross-entropy) with each block removed on its own, on the first
    LOSS_WINDOWS calibration windows."""
    out = []
    for layer in tqdm(job.layers.modules, desc="depth: loss without each block", disable=not job.progress,
                      unit="block"):
        hook = layer.register_forward_hook(lambda m, a, kw, o: _skip(a, kw, o), with_kwargs=True)
        try:
            out.append(_loss(job))
        finally:
            hook.remove()
    return out


def _skip(args, kwargs, output):
    """A block's output replaced by its input: the block is removed for this pass."""
    h = _hidden(args, kwargs)
    return (h, *output[1:]) if isinstance(output, tuple) else h


def choose_blocks(job: Job) -> tuple[list[int], list[float]]:
    """The blocks to remove, and the calibration loss without each block they were chosen by."""
    n = len(job.layers)
    k = blocks_to_remove(job.config.ratio, n)
    if k == 0:
        return [], []
    losses = loss_without_each(job)
    return sorted(sorted(range(n), key=losses.__getitem__)[:k]), losses


class Depth(Method):
    name = "depth"
    summary = "remove whole blocks (the model's own architecture with fewer layers, for every engine)"
    streams = False
    widths = False

    def run(self, job: Job, statistics=None) -> tuple[PrunePlan, None]:
        if not hasattr(job.layers, "modules"):
            raise FlapError("--method depth needs the model in memory; drop --offload")
        dims = job.dims
        with job.timer("scores"):
            drop, _ = choose_blocks(job)
        full = LayerPlan(tuple(range(dims.n_heads)), tuple(range(dims.n_kv_heads)), tuple(range(dims.d_ff)))
        empty = LayerPlan((), (), ())
        plan = PrunePlan(tuple(empty if i in drop else full for i in range(dims.n_layers)), tuple(drop))
        with job.timer("apply"):
            job.apply(plan, None)
        return plan, None

    def uniform(self, options) -> bool:
        return True

    def cost(self, inputs, options):
        """A pass over the first LOSS_WINDOWS windows per block, each batch's logits at its peak."""
        from ..reporting.estimate import Cost
        s, batch = inputs.shapes, inputs.batch_size * inputs.seqlen
        windows = min(LOSS_WINDOWS, inputs.tokens // inputs.seqlen)
        return Cost(parts={"logits of one batch": batch * s.vocab * 4 * 2}, forward=0,
                    work={"forward passes over the first windows": f"{s.n_layers} (one per block) over {windows} windows"})

    def label(self, options) -> str:
        return "depth"
