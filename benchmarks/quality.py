"""The quality table: dense, FLAP, wanda-sp and mag-sp at several ratios, the metric x structure ablation,
and bias vs least-squares compensation: perplexity on held-out Wikipedia windows and zero-shot accuracy.

Each finished row is appended to a JSONL file, so the run can be stopped and resumed; `--render` writes
the markdown tables from it. Example (the command recorded in BENCHMARKS.md):

  .venv/bin/python benchmarks/quality.py --model smollm2 --nsamples 256 --zs-limit 100
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
from common import MODELS, append_jsonl, command_line, commands_of, load, read_jsonl  # noqa: E402
from flap_llm.calibration.data import calibration_windows  # noqa: E402
from flap_llm.eval.evaluate import perplexity  # noqa: E402
from flap_llm.reporting.report import versions  # noqa: E402
from flap_llm.eval.zeroshot import TASKS, evaluate_zeroshot  # noqa: E402


def rows_to_run(include_lsq: bool) -> list[dict]:
    rows = [dict(name="dense", ratio=0.0)]
    for ratio in (0.2, 0.3, 0.5):
        rows += [dict(name="flap", ratio=ratio), dict(name="wanda-sp", ratio=ratio, method="wanda-sp"),
                 dict(name="mag-sp", ratio=ratio, method="mag-sp")]
    for metric in ("IFV", "WIFV", "WIFN"):
        for structure in ("UL-UM", "AL-AM"):
            if (metric, structure) != ("WIFV", "AL-AM"):  # that one is the FLAP 50% row
                rows.append(dict(name=f"ablation {metric} {structure}", ratio=0.5, metric=metric, structure=structure))
    if include_lsq:
        rows += [dict(name="flap lsq", ratio=r, compensation="lsq") for r in (0.2, 0.5)]
    rows += [dict(name="obs", ratio=r, method="obs") for r in (0.2, 0.5)]
    return rows


def render(results: Path) -> str:
    """Markdown tables of every measured row, per model, in the order of the runs."""
    rows = read_jsonl(results)
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        first = mine[0]
        zs_tasks = list(TASKS)
        out.append(f"### {model}\n")
        out.append(f"Calibration: {first['nsamples']} windows x {first['seqlen']} tokens of builtin:wiki (seed "
                   f"{first['seed']}); perplexity on {first['ppl_windows']} held-out windows of 128 tokens; zero-shot "
                   f"acc (%) on the first {first['zs_limit']} examples of each task (`--limit`), lm-eval 0.4.13.\n")
        head = "| method | ratio | removed (decoder / model) | ppl | " + " | ".join(zs_tasks) + " | avg | prune (s) |"
        out += [head, "|---|---:|---:|---:|" + "---:|" * len(zs_tasks) + "---:|---:|"]
        for r in mine:
            if r.get("refused"):
                why = r["refused"].split(":")[0]  # "method obs is not offered for <family>"
                out.append(f"| {r['name']} | {r['ratio']:.0%} | refused up front: {why} (docs/obs.md) |"
                           + " |" * (len(zs_tasks) + 3))
                continue
            zs = r.get("zeroshot") or {}
            cells = [f"{100 * zs[t]['acc']:.1f}" if t in zs else "–" for t in zs_tasks]
            avg = f"{100 * zs['average']:.2f}" if zs else "–"
            out.append(f"| {r['name']} | {r['ratio']:.0%} | {r['removed_decoder']:.1%} / {r['removed_model']:.1%} | "
                       f"{r['ppl']:.2f} | " + " | ".join(cells) + f" | {avg} | {r['prune_s']:.0f} |")
        out.append("\nprune (s): wall time of pruning alone; FLAP rows after the first reuse its dense statistics "
                   "(`prune(..., statistics=...)`), so they show only planning and slicing. A row whose zero-shot "
                   "cells read – was measured for perplexity only (`--zs-limit 0`).")
        out.append("\n" + commands_of(mine) + f"  \nVersions: `{json.dumps(first['versions'])}`\n")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2", choices=sorted(MODELS))
    ap.add_argument("--nsamples", type=int, default=256)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-limit", type=int, default=None, help="perplexity windows (default all held-out)")
    ap.add_argument("--zs-limit", type=int, default=100, help="zero-shot examples per task (0 = skip)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--no-lsq", action="store_true")
    ap.add_argument("--only", default=None, help="comma-separated row names to run")
    ap.add_argument("--ratios", default=None, help="comma-separated ratios to run (dense always qualifies)")
    ap.add_argument("--results", default="benchmarks/results/quality.jsonl")
    ap.add_argument("--render", action="store_true", help="print the markdown tables of the results and exit")
    args = ap.parse_args()
    if args.render:
        print(render(Path(args.results)))
        return
    torch.manual_seed(0)
    results = Path(args.results)
    done = {(r["model"], r["name"], r["ratio"]) for r in read_jsonl(results)}
    model, tok, path = load(args.model)
    calib = calibration_windows("builtin:wiki", tok, args.nsamples, args.seqlen, args.seed)
    stats = None
    only = set(args.only.split(",")) if args.only else None
    ratios = {float(r) for r in args.ratios.split(",")} if args.ratios else None
    for row in rows_to_run(not args.no_lsq):
        if (args.model, row["name"], row["ratio"]) in done or (only and row["name"] not in only):
            continue
        if ratios and row["name"] != "dense" and row["ratio"] not in ratios:
            continue
        t0 = time.perf_counter()
        cfg = {k: v for k, v in row.items() if k != "name"}
        m = copy.deepcopy(model)
        report = None
        if row["name"] != "dense":
            reuse = stats if cfg.get("method", "flap") == "flap" else None
            try:
                result = flap_llm.prune(m, calib, flap_llm.PruneConfig(**cfg), batch_size=args.batch_size,
                                        statistics=reuse)
            except flap_llm.FlapError as e:  # a method refused for this family: the table says so
                append_jsonl(results, {"model": args.model, "name": row["name"], "ratio": row["ratio"], "config": cfg,
                                       "refused": str(e), "versions": versions(), "command": command_line()})
                print(f"{args.model} {row['name']} {row['ratio']}: refused ({e})", flush=True)
                continue
            if result.stats is not None and stats is None:
                stats = result.stats
            report = result.report
        prune_s = time.perf_counter() - t0
        ppl = perplexity(m, tok, "builtin:wiki", 128, args.batch_size, args.eval_limit)
        zs = evaluate_zeroshot(m, tok, TASKS, args.zs_limit, args.batch_size) if args.zs_limit else None
        out = {"model": args.model, "name": row["name"], "ratio": row["ratio"], "config": cfg,
               "removed_decoder": report["params"]["decoder_removed_fraction"] if report else 0.0,
               "removed_model": report["params"]["model_removed_fraction"] if report else 0.0,
               "ppl": ppl["ppl"], "ppl_windows": ppl["windows"], "zeroshot": zs, "prune_s": prune_s,
               "prune_timings": report["timings_s"] if report else None,
               "total_s": time.perf_counter() - t0, "nsamples": args.nsamples, "seqlen": args.seqlen,
               "seed": args.seed, "zs_limit": args.zs_limit, "versions": versions(),
               "command": command_line()}
        append_jsonl(results, out)
        print(f"{args.model} {row['name']} {row['ratio']}: ppl {ppl['ppl']:.2f}"
              + (f", zero-shot avg {100 * zs['average']:.2f}" if zs else "") + f" ({out['total_s']:.0f}s)", flush=True)
        del m


if __name__ == "__main__":
    main()
