"""How obs's output Fisher is spread over directions, layer by layer: whether its ridge (`FISHER_RIDGE`, a share
of the mean eigenvalue added to F before F^(1/2) weighs the refit) touches much of it. A ridge only changes the
weighting where eigenvalues are near or below it; if none is, a larger one would only flatten the weighting
towards plain least squares, not rescue directions the calibration text left unweighted.

The Fisher is obs's own: the same calibration windows (seed 0), the same share of them (`FISHER_FRACTION`), the
same label draws. One JSONL row per model; `--render` prints the tables.

  .venv/bin/python benchmarks/studies/fisher_spectrum.py --model smollm2
  .venv/bin/python benchmarks/studies/fisher_spectrum.py --render
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py
from common import MODELS, append_jsonl, command_line, commands_of, load, read_jsonl  # noqa: E402
from flap_llm.model.arch import spec_of  # noqa: E402
from flap_llm.methods.obs import FISHER_FRACTION  # noqa: E402
from flap_llm.calibration.data import calibration_windows  # noqa: E402
from flap_llm.calibration.fisher import output_fisher, weighting, window_selected  # noqa: E402
from flap_llm.methods.obs import FISHER_RIDGE  # noqa: E402
from flap_llm.reporting.report import versions  # noqa: E402

RIDGES = (FISHER_RIDGE, 0.1)  # obs's ridge, and ten times it


def spectrum_stats(fisher: torch.Tensor, ridges: tuple[float, ...] = RIDGES) -> dict:
    """Eigenvalues of a symmetric F relative to their mean: the median, the smallest, the share below each ridge,
    the share of the trace in the top 1% of directions; and for each ridge, how far the weighting F^(1/2) moves
    from the ridge-free one (relative Frobenius norm)."""
    f = fisher.to(torch.float64)
    vals = torch.linalg.eigvalsh(f).clamp_min(0)
    mean = vals.mean()
    rel = vals / mean
    top = max(1, round(0.01 * len(vals)))
    plain = weighting(f, 0.0)
    return {"median": rel.median().item(), "min": rel.min().item(),
            "top1pct_share": (vals.sort(descending=True).values[:top].sum() / vals.sum()).item(),
            **{f"below_{r}": (rel < r).double().mean().item() for r in ridges},
            **{f"weighting_change_{r}": ((weighting(f, r) - plain).norm() / plain.norm()).item() for r in ridges}}


def render(results: Path) -> str:
    out = []
    for row in read_jsonl(results):
        out += [f"#### {row['model']} ({row['layers']} layers, Fisher from {row['fisher_windows']} of "
                f"{row['nsamples']} windows)\n",
                "| module | eigenvalue median / mean | smallest / mean | top 1% of directions: share of the trace | "
                + " | ".join(f"below {r} of the mean" for r in RIDGES) + " | "
                + " | ".join(f"weighting change at ridge {r}" for r in RIDGES) + " |",
                "|---|---|---|---|" + "---|" * (2 * len(RIDGES))]
        for module in ("attn", "mlp"):
            stats = [layer[module] for layer in row["per_layer"]]

            def span(key, fmt):
                lo, hi = min(s[key] for s in stats), max(s[key] for s in stats)
                return f"{lo:{fmt}} – {hi:{fmt}}"
            out.append(f"| {module} (o_proj's output)" if module == "attn" else "| mlp (down_proj's output)")
            out[-1] += (f" | {span('median', '.2f')} | {span('min', '.1e')} | {span('top1pct_share', '.0%')} | "
                        + " | ".join(span(f"below_{r}", ".1%") for r in RIDGES) + " | "
                        + " | ".join(span(f"weighting_change_{r}", ".3f") for r in RIDGES) + " |")
        out.append("\nRanges over the layers. " + commands_of([row]) + f"  \nVersions: `{json.dumps(row['versions'])}`\n")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2", choices=sorted(MODELS))
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--results", default="benchmarks/results/fisher_spectrum.jsonl")
    ap.add_argument("--render", action="store_true")
    args = ap.parse_args()
    if args.render:
        print(render(Path(args.results)))
        return
    model, tok, _ = load(args.model)
    calib = calibration_windows("builtin:wiki", tok, args.nsamples, args.seqlen, 0)
    batches = list(calib.split(args.batch_size))
    t = time.perf_counter()
    fisher = output_fisher(model, spec_of(model), batches, fraction=FISHER_FRACTION, progress=True)
    picked = sum(int(window_selected(b, 0, FISHER_FRACTION).sum()) for b in batches) or args.nsamples  # none: all
    row = {"model": args.model, "nsamples": args.nsamples, "seqlen": args.seqlen, "fisher_windows": picked,
           "layers": len(fisher), "fisher_s": time.perf_counter() - t,
           "per_layer": [{k: spectrum_stats(f) for k, f in layer.items()} for layer in fisher],
           "versions": versions(), "command": command_line()}
    append_jsonl(Path(args.results), row)
    print(render(Path(args.results)))


if __name__ == "__main__":
    main()
