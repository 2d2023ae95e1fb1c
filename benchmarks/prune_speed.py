"""Pruning time against the floor of one forward pass, side by side in one run.

flap_llm.prune on SmolLM2 with 256 windows x 128 tokens (batch 16) against one plain batched forward
pass of the same tokens (batch 16), alternating, median of --repeat runs each.

  .venv/bin/python benchmarks/prune_speed.py --repeat 3
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import flap_llm  # noqa: E402
from common import MODELS, command_line, load, synchronize  # noqa: E402
from flap_llm.calibration.data import calibration_windows  # noqa: E402
from flap_llm.reporting.report import versions  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2", choices=sorted(MODELS))
    ap.add_argument("--nsamples", type=int, default=256)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    model, tok, _ = load(args.model)
    model = model.to(args.device, getattr(torch, args.dtype))
    calib = calibration_windows("builtin:wiki", tok, args.nsamples, args.seqlen, 0)
    batches = calib.split(args.batch_size)

    @torch.no_grad()
    def forward(body_only: bool):
        net = model.model if body_only else model
        for b in batches:
            net(b.to(args.device), use_cache=False)
        synchronize(args.device)

    times = {"forward": [], "forward_no_lm_head": [], "prune": []}
    for _ in range(args.repeat):
        for key, body in (("forward", False), ("forward_no_lm_head", True)):
            t = time.perf_counter()
            forward(body)
            times[key].append(time.perf_counter() - t)
        m = copy.deepcopy(model)  # not timed
        t = time.perf_counter()
        result = flap_llm.prune(m, calib, flap_llm.PruneConfig(ratio=0.2), batch_size=args.batch_size)
        synchronize(args.device)
        times["prune"].append(time.perf_counter() - t)
        del m
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    out = {"model": args.model, "device": args.device, "dtype": args.dtype, "nsamples": args.nsamples,
           "seqlen": args.seqlen, "batch_size": args.batch_size, "median_s": med, "all_s": times,
           "prune_over_forward": med["prune"] / med["forward"],
           "prune_over_forward_no_lm_head": med["prune"] / med["forward_no_lm_head"],
           "prune_timings_last": result.report["timings_s"], "versions": versions(),
           "command": command_line()}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
