"""How well the least-squares refit of a pruned down_proj carries over from the calibration windows to other
text: for a few layers of a model, the MLP input channels are removed by greedy structured OBS (on the plain
output error) and the kept columns refit by `lsq_compensation`, at several dampings; the relative output
error (mean squared error over the output's variance) is measured on the calibration windows themselves and
on validation windows drawn from the same calibration articles with another seed (never the evaluation text).
Variants (rows with their own `ridge` / `steps` fields): `--ridge diagonal` regularizes each input by its own
variance (H = C + damp diag(C), a ridge on standardized inputs) instead of obs's uniform ridge (H = C + damp
mean(diag C) I); `--steps` sets the greedy's granularity (obs takes 1/128 of the channels per step);
`--select-damps` chooses the channels with other ridges than the refit's (obs uses one ridge for both).

  .venv/bin/python benchmarks/studies/refit_generalization.py --model qwen0.5b
  .venv/bin/python benchmarks/studies/refit_generalization.py --render [--damps 0.01,0.1]
  .venv/bin/python benchmarks/studies/refit_generalization.py --render-relative
  .venv/bin/python benchmarks/studies/refit_generalization.py --model qwen0.5b --ridge diagonal --damps 0.1,0.3,1
  .venv/bin/python benchmarks/studies/refit_generalization.py --model qwen0.5b --damps 0.1 --select-damps 0.3,1,3
  .venv/bin/python benchmarks/studies/refit_generalization.py --render-variants
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py
from common import MODELS, append_jsonl, command_line, commands_of, load, read_jsonl  # noqa: E402
from flap_llm.model.arch import decoder_layers, spec_of  # noqa: E402
from flap_llm.math.compensate import lsq_compensation  # noqa: E402
from flap_llm.calibration.data import calibration_windows  # noqa: E402
from flap_llm.methods.obs import STEPS  # noqa: E402
from flap_llm.math.reconstruct import damped, removal_path  # noqa: E402
from flap_llm.reporting.report import versions  # noqa: E402
from flap_llm.calibration.walk import output_projections  # noqa: E402

def mlp_inputs(model, spec, ids: torch.Tensor, layers: list[int], batch_size: int) -> dict[int, torch.Tensor]:
    """The inputs of the given layers' down_proj over all tokens of `ids`, float64 [tokens, d_ff]."""
    got: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    blocks = decoder_layers(model, spec)
    handles = [output_projections(blocks[i], spec)["mlp"].register_forward_pre_hook(
        lambda mod, args, i=i: got[i].append(args[0].reshape(-1, args[0].shape[-1]).to(torch.float64)))
        for i in layers]
    try:
        with torch.no_grad():
            for batch in ids.split(batch_size):
                model(input_ids=batch, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {i: torch.cat(v) for i, v in got.items()}


def relative_error(weight, x, kept, w_kept, bias) -> float:
    y = x @ weight.T
    err = y - (x[:, kept] @ w_kept.T + bias)
    return float((err ** 2).sum(1).mean() / ((y - y.mean(0)) ** 2).sum(1).mean())


def is_default(row: dict) -> bool:
    """A row of obs's own refit: the uniform ridge and obs's greedy steps (rows from before the variants have
    neither field)."""
    return (row.get("ridge", "uniform") == "uniform" and row.get("steps", STEPS) == STEPS
            and row.get("select_damp", row["damp"]) == row["damp"])


def case_of(row: dict) -> tuple:
    return row["model"], row["calib_tokens"], row["layer"], row["removed"]


def regularized(cov: torch.Tensor, damp: float, ridge: str) -> torch.Tensor:
    """H: the uniform ridge (`reconstruct.damped`, what obs uses) or each input's variance times damp."""
    if ridge == "uniform":
        return damped(cov, damp)
    diag = cov.diagonal()
    return cov + torch.diag(damp * diag + 1e-12 * diag.mean())


def render_variants(path: Path) -> str:
    """Each variant's validation error over obs's refit (uniform ridge 0.1, 128 steps) on the same case."""
    rows = read_jsonl(path)
    base = {case_of(r): r["valid_error"] for r in rows if is_default(r) and r["damp"] == 0.1}
    variants = [r for r in rows if not is_default(r) and case_of(r) in base]
    out = ["| model | calibration tokens | layer | removed | variant | damping | validation rel. error | "
           "/ uniform ridge 0.1, 128 steps |", "|---|---:|---:|---:|---|---:|---:|---:|"]
    for r in variants:
        name = (f"{r['ridge']} ridge" if r["ridge"] != "uniform" else f"{r['steps']} steps" if r["steps"] != STEPS
                else f"chosen with ridge {r['select_damp']}")
        ref = base[case_of(r)]
        out.append(f"| {r['model']} | {r['calib_tokens']:,} | {r['layer']} | {r['removed']:.0%} | {name} | "
                   f"{r['damp']} | {r['valid_error']:.5f} | {r['valid_error'] / ref:.3f} |")
    out.append("\n" + commands_of(variants))
    return "\n".join(out)


def render(path: Path, damps: list[float]) -> str:
    rows = [r for r in read_jsonl(path) if r["damp"] in damps and is_default(r)]
    out = ["| model | calibration tokens | layer | removed | damping | calibration rel. error | validation rel. "
           "error | validation / calibration |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['model']} | {r['calib_tokens']:,} | {r['layer']} | {r['removed']:.0%} | {r['damp']} | "
                   f"{r['calib_error']:.4f} | {r['valid_error']:.4f} | {r['valid_error'] / r['calib_error']:.2f} |")
    out.append("\n" + commands_of(rows))
    return "\n".join(out)


def render_relative(path: Path) -> str:
    """Each damping's validation error over the best damping's, per model, calibration size, layer and fraction
    removed."""
    rows = [r for r in read_jsonl(path) if is_default(r)]
    damps = sorted({r["damp"] for r in rows})
    cases: dict[tuple, dict[float, float]] = {}
    for r in rows:
        cases.setdefault(case_of(r), {})[r["damp"]] = r["valid_error"]
    out = ["| model | calibration tokens | layer | removed | " + " | ".join(f"damp {d}" for d in damps) + " |",
           "|---|---:|---:|---:|" + "---:|" * len(damps)]
    relative = {case: {d: e / min(errs.values()) for d, e in errs.items()} for case, errs in cases.items()}
    for (model, tokens, layer, removed), rel in relative.items():
        out.append(f"| {model} | {tokens:,} | {layer} | {removed:.0%} | "
                   + " | ".join(f"{rel[d]:.3f}" if d in rel else "–" for d in damps) + " |")
    for size in sorted({case[1] for case in relative}):
        mine = [rel for case, rel in relative.items() if case[1] == size]
        worst = [max((rel[d] for rel in mine if d in rel), default=None) for d in damps]
        out.append(f"| worst | {size:,} | | | " + " | ".join("–" if w is None else f"{w:.3f}" for w in worst) + " |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen0.5b", choices=sorted(MODELS))
    ap.add_argument("--layers", default=None, help="comma-separated layer indices (default: 1/8, 1/2, 5/6 deep)")
    ap.add_argument("--removed", default="0.2,0.5", help="fractions of the MLP channels removed")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--valid-samples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--damps", default="0.001,0.01,0.03,0.1,0.3", help="dampings to run (or to show, with --render)")
    ap.add_argument("--ridge", default="uniform", choices=["uniform", "diagonal"],
                    help="the ridge's shape: obs's uniform one, or each input's variance times the damping")
    ap.add_argument("--select-damps", default=None,
                    help="ridges the channels are chosen with (default: each refit's own damping, as obs does)")
    ap.add_argument("--steps", type=int, default=STEPS, help=f"greedy steps over the layer's width (obs: {STEPS})")
    ap.add_argument("--results", default="benchmarks/results/refit_generalization.jsonl")
    ap.add_argument("--render", action="store_true")
    ap.add_argument("--render-relative", action="store_true",
                    help="each damping's validation error over the best one's, per case")
    ap.add_argument("--render-variants", action="store_true",
                    help="the ridge-shape and greedy-step variants against obs's own refit")
    args = ap.parse_args()
    if args.render_relative:
        print(render_relative(Path(args.results)))
        return
    if args.render_variants:
        print(render_variants(Path(args.results)))
        return
    damps = [float(d) for d in args.damps.split(",")]
    select_damps = [float(d) for d in args.select_damps.split(",")] if args.select_damps else None
    if args.render:
        print(render(Path(args.results), damps))
        return
    model, tok, _ = load(args.model)
    spec = spec_of(model)
    n_layers = len(decoder_layers(model, spec))
    layers = ([int(i) for i in args.layers.split(",")] if args.layers
              else sorted({n_layers // 8, n_layers // 2, 5 * n_layers // 6}))
    calib_ids = calibration_windows("builtin:wiki", tok, args.nsamples, args.seqlen, 0)
    valid = mlp_inputs(model, spec, calibration_windows("builtin:wiki", tok, args.valid_samples, args.seqlen, 1234),
                       layers, args.batch_size)
    for i in layers:  # one layer's calibration inputs at a time (5 GB for Qwen2.5-0.5B at 1,024 windows)
        x, v = mlp_inputs(model, spec, calib_ids, [i], args.batch_size)[i], valid[i]
        weight = output_projections(decoder_layers(model, spec)[i], spec)["mlp"].weight.detach().to(torch.float64)
        d = weight.shape[1]
        mean = x.mean(0)
        cov = (x - mean).T @ (x - mean) / x.shape[0]
        for frac in (float(f) for f in args.removed.split(",")):
            n = int(frac * d)
            for damp, select_damp in ((a, b) for a in damps for b in (select_damps or [a])):
                h = regularized(cov, damp, args.ridge)
                chooser = h if select_damp == damp else regularized(cov, select_damp, args.ridge)
                removed = removal_path(weight, chooser, 1, n, max(1, d // args.steps)).order
                keep = torch.ones(d, dtype=torch.bool)
                keep[removed] = False
                kept = torch.nonzero(keep).flatten()
                # the diagonal ridge is already in h (its off-diagonal blocks are cov's): no ridge on top
                uniform = args.ridge == "uniform"
                w_kept, bias = lsq_compensation(weight, None, mean, cov if uniform else h, kept, removed,
                                                damp if uniform else 0.0)
                row = {"model": args.model, "layer": i, "removed": frac, "damp": damp, "calib_tokens": x.shape[0],
                       "ridge": args.ridge, "steps": args.steps, "select_damp": select_damp,
                       "valid_tokens": v.shape[0], "d_ff": d,
                       "calib_error": relative_error(weight, x, kept, w_kept, bias),
                       "valid_error": relative_error(weight, v, kept, w_kept, bias),
                       "versions": versions(), "command": command_line()}
                append_jsonl(Path(args.results), row)
                print(f"layer {i} removed {frac:.0%} {args.ridge} ridge {damp} (chosen with {select_damp}), "
                      f"{args.steps} steps: "
                      f"calibration {row['calib_error']:.4f} validation {row['valid_error']:.4f}", flush=True)


if __name__ == "__main__":
    main()
