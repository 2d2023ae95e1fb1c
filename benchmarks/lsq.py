"""Bias vs least-squares compensation (same FLAP plan), perplexity on held-out Wikipedia windows and the
extra pruning time, side by side in one run.

  .venv/bin/python benchmarks/lsq.py --model smollm2 --nsamples 256 --eval-limit 64
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import flap_llm  # noqa: E402
from common import MODELS, command_line, load  # noqa: E402
from flap_llm.calibration.data import calibration_windows  # noqa: E402
from flap_llm.eval.evaluate import perplexity  # noqa: E402
from flap_llm.reporting.report import versions  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2", choices=sorted(MODELS))
    ap.add_argument("--nsamples", type=int, default=256)
    ap.add_argument("--eval-limit", type=int, default=64)
    ap.add_argument("--ratios", default="0.2,0.5")
    ap.add_argument("--sequential", action="store_true", help="also run lsq --sequential")
    args = ap.parse_args()
    model, tok, _ = load(args.model)
    calib = calibration_windows("builtin:wiki", tok, args.nsamples, 128, 0)
    rows = [{"name": "dense", "ppl": perplexity(model, tok, limit=args.eval_limit, batch_size=16)["ppl"]}]
    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    variants = [("bias", False), ("lsq", False)] + ([("lsq", True)] if args.sequential else [])
    for ratio in map(float, args.ratios.split(",")):
        for comp, seq in variants:
            m = copy.deepcopy(model)
            t = time.perf_counter()
            r = flap_llm.prune(m, calib, flap_llm.PruneConfig(ratio=ratio, compensation=comp, sequential=seq),
                               batch_size=16)
            rows.append({"ratio": ratio, "compensation": comp, "sequential": seq, "prune_s": time.perf_counter() - t,
                         "timings_s": r.report["timings_s"],
                         "ppl": perplexity(m, tok, limit=args.eval_limit, batch_size=16)["ppl"]})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(json.dumps({"model": args.model, "nsamples": args.nsamples, "eval_limit": args.eval_limit, "rows": rows,
                      "versions": versions(), "command": command_line()}, indent=2))


if __name__ == "__main__":
    main()
