"""What obs's `token_windows` factors are, and how much of them is sampling noise. One prune with
`token_windows` (at the uniform width of the ratio) records, per module, the factor it measured (the cost of the
refit with each sampled token's own Fisher over its cost with the averaged one), that factor's sampling standard
deviation in log over the sampled windows (`reconstruct.log_ratio`) and the factor `token_shrink` makes of it
(`reconstruct.shrunk_log_factors`); the prune stops there, before the refit pass. One JSONL row per run;
`--render` prints the table.

  .venv/bin/python benchmarks/token_factors.py --model smollm2 --seed 0 --ratio 0.5
  .venv/bin/python benchmarks/token_factors.py --render
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MODELS, append_jsonl, command_line, commands_of, load, read_jsonl  # noqa: E402
import flap_llm  # noqa: E402
from flap_llm.data import calibration_windows  # noqa: E402
from flap_llm.methods import obs as obs_method  # noqa: E402


class _Measured(Exception):
    """Raised once the factors are in: the rest of the prune is not needed."""

    def __init__(self, logs: torch.Tensor, variances: torch.Tensor, shrunk: torch.Tensor) -> None:
        super().__init__("factors measured")
        self.logs, self.variances, self.shrunk = logs, variances, shrunk


def measure(model, calib: torch.Tensor, ratio: float, windows: int) -> dict:
    real = obs_method.shrunk_log_factors

    def stop(logs, variances):
        raise _Measured(logs, variances, real(logs, variances))
    obs_method.shrunk_log_factors = stop
    try:
        flap_llm.prune(model, calib, flap_llm.PruneConfig(ratio=ratio, method="obs", token_windows=windows,
                                                          token_shrink=True), progress=False)
    except _Measured as m:
        names = [f"{i // 2}.{'attn' if i % 2 == 0 else 'mlp'}" for i in range(m.logs.numel())]
        return {"modules": names, "factor": m.logs.exp().tolist(), "sd_log": m.variances.sqrt().tolist(),
                "shrunk": m.shrunk.exp().tolist()}
    finally:
        obs_method.shrunk_log_factors = real
    raise RuntimeError("the prune finished without measuring token factors")


def render(path: Path) -> str:
    rows = read_jsonl(path)
    out = []
    for r in rows:
        logs = [math.log(f) for f in r["factor"]]
        mean = sum(logs) / len(logs)
        spread = math.sqrt(sum((x - mean) ** 2 for x in logs) / len(logs))
        noise = math.sqrt(sum(s * s for s in r["sd_log"]) / len(logs))
        moved = sorted(range(len(logs)), key=lambda i: -abs(math.log(r["shrunk"][i]) - logs[i]))[:4]
        out.append(f"| {r['model']} | {r['ratio']:.0%} | {r['seed']} | {spread:.3f} | {noise:.3f} | "
                   f"{min(r['sd_log']):.3f}–{max(r['sd_log']):.3f} | {min(r['factor']):.2f}–{max(r['factor']):.2f} | "
                   + ", ".join(f"{r['modules'][i]} {r['factor'][i]:.2f} → {r['shrunk'][i]:.2f}" for i in moved) + " |")
    head = ("| model | ratio | calibration seed | spread of log factors (sd) | sampling noise (rms sd of a log factor) | "
            "sd of a log factor | factors | most moved by token_shrink |\n|---|---:|---:|---:|---:|---|---|---|")
    return head + "\n" + "\n".join(out) + "\n\n" + commands_of(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2", choices=sorted(MODELS))
    ap.add_argument("--seed", type=int, default=0, help="the calibration draw")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--windows", type=int, default=16, help="token_windows")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--results", default="benchmarks/results/token_factors.jsonl")
    ap.add_argument("--render", action="store_true")
    args = ap.parse_args()
    if args.render:
        print(render(Path(args.results)))
        return
    model, tok, _ = load(args.model)
    calib = calibration_windows("builtin:wiki", tok, args.nsamples, args.seqlen, args.seed)
    row = {"model": args.model, "seed": args.seed, "ratio": args.ratio, "windows": args.windows,
           "nsamples": args.nsamples, "seqlen": args.seqlen, "command": command_line(),
           **measure(model, calib, args.ratio, args.windows)}
    append_jsonl(Path(args.results), row)
    print(render(Path(args.results)))


if __name__ == "__main__":
    main()
