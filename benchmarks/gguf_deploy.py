"""Deployed in llama.cpp: dense / FLAP 20% / FLAP 50% as GGUF (f16, and Q4_K_M made by llama-quantize),
with file size, llama-perplexity on held-out Wikipedia, and llama-bench tokens/s (pp512, tg128, 2 threads;
the models interleaved, one repetition each per round, medians over rounds). Also the same perplexity
computed by transformers on the fp32 model (the numbers the GGUF should reproduce) and the FLOP-ideal speedup.

  .venv/bin/python benchmarks/gguf_deploy.py --models smollm2,qwen0.5b --rounds 5
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import flap_llm  # noqa: E402
from common import append_jsonl, llama_bench, load  # noqa: E402
from flap_llm.export import llamacpp  # noqa: E402
from flap_llm.calibration.data import calibration_windows, load_texts  # noqa: E402
from flap_llm.eval.evaluate import chunked_perplexity  # noqa: E402
from flap_llm.reporting.report import versions  # noqa: E402
from inference_speed import flops_per_token  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "gguf_deploy.jsonl"


def render(path: Path = RESULTS) -> str:
    """BENCHMARKS.md rows from the results file (the newest run of each model/ratio/align/dtype)."""
    from common import read_jsonl
    # runs: rows without an "align" key come from the first run (exact widths only); speedups are always
    # relative to the dense model of the same run
    rows = {(r["model"], r["ratio"], r.get("align"), r["dtype"], "align" in r): r for r in read_jsonl(path)}
    out = ["| model | FLAP | align | GGUF | size MiB | ppl llama.cpp | ppl transformers fp32 | pp512 t/s | tg128 t/s "
           "| pp speedup (FLOP ideal) | speedup / ideal | tg speedup |", "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (model, ratio, align, dtype, _), r in sorted(rows.items(), key=lambda kv: (kv[0][0], kv[0][3], kv[0][4],
                                                                                    kv[0][1], kv[0][2] or 0)):
        out.append(f"| {model} | {ratio:.0%} | {align or '-'} | {dtype} | {r['bytes'] / 2**20:.0f} | "
                   f"{r['ppl_llama_cpp']:.2f} | {r['ppl_transformers_fp32']:.2f} | {r['pp512']:.0f} | {r['tg128']:.1f} | "
                   f"{r['speedup_pp512']:.2f} ({r['ideal_speedup_pp']:.2f}) | "
                   f"{100 * r['speedup_pp512'] / r['ideal_speedup_pp']:.0f}% | "
                   f"{r['speedup_tg128']:.2f} |" if ratio else
                   f"| {model} | dense | - | {dtype} | {r['bytes'] / 2**20:.0f} | {r['ppl_llama_cpp']:.2f} | "
                   f"{r['ppl_transformers_fp32']:.2f} | {r['pp512']:.0f} | {r['tg128']:.1f} | 1 | | 1 |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="smollm2,qwen0.5b")
    ap.add_argument("--ratios", default="0,0.2,0.5")
    ap.add_argument("--nsamples", type=int, default=128, help="calibration windows of 128 tokens")
    ap.add_argument("--ctx", type=int, default=256, help="llama-perplexity chunk length")
    ap.add_argument("--chunks", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quants", default="Q4_K_M")
    ap.add_argument("--aligns", default="none", help="comma list of --align values for the pruned rows, 'none' = exact")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="flap-gguf-"))
    text_file = work / "wiki_eval.txt"
    text_file.write_text("\n\n".join(load_texts("builtin:wiki", "eval")))
    for name in args.models.split(","):
        dense, tok, _ = load(name)
        ids = tok(text_file.read_text(), add_special_tokens=False, return_tensors="pt").input_ids[0]
        calib = calibration_windows("builtin:wiki", tok, args.nsamples, 128, 0)
        files: dict[str, Path] = {}
        rows: dict[str, dict] = {}
        aligns = [None if a == "none" else int(a) for a in args.aligns.split(",")]
        jobs = [(float(r), a) for r in args.ratios.split(",") for a in (aligns if float(r) > 0 else [None])]
        for ratio, align in jobs:
            model = copy.deepcopy(dense)
            if ratio > 0:
                flap_llm.prune(model, calib, flap_llm.PruneConfig(ratio=ratio, align=align), batch_size=16)
            ref = chunked_perplexity(model, ids, args.ctx, args.chunks)
            ideal = flops_per_token(dense, 256) / flops_per_token(model, 256)
            label = f"{ratio:.0%}" + (f" align{align}" if align else "")
            stem = f"{name}-{ratio}-{align or 0}"
            f16 = flap_llm.save_gguf(model, work / f"{stem}-f16.gguf", tok, "f16")
            variants = {"f16": f16}
            for q in args.quants.split(","):
                variants[q] = llamacpp.quantize(f16, work / f"{stem}-{q}.gguf", q, args.threads)
            for dtype, path in variants.items():
                key = f"{label} {dtype}"
                files[key] = path
                rows[key] = {"model": name, "ratio": ratio, "align": align, "dtype": dtype, "bytes": path.stat().st_size,
                             "ppl_llama_cpp": llamacpp.perplexity(path, text_file, args.ctx, args.chunks, args.threads),
                             "ppl_transformers_fp32": ref, "ideal_speedup_pp": ideal}
                print(key, rows[key], flush=True)
            del model
        speed = llama_bench(files, args.rounds, args.threads)
        for key, row in rows.items():
            row.update(speed[key])
            base = rows[f"0% {row['dtype']}"]
            row["speedup_pp512"] = row["pp512"] / base["pp512"]
            row["speedup_tg128"] = row["tg128"] / base["tg128"]
            row.update(ctx=args.ctx, chunks=args.chunks, nsamples=args.nsamples, rounds=args.rounds,
                       threads=args.threads, versions=versions())
            append_jsonl(RESULTS, row)
            print(json.dumps({k: v for k, v in row.items() if k != "versions"}), flush=True)


if __name__ == "__main__":
    torch.set_num_threads(2)
    if sys.argv[1:] == ["--render"]:
        print(render())
    else:
        main()
