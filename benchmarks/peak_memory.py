"""Peak RSS and time of pruning a real model, each run in a fresh process (ru_maxrss is per process): FLAP,
obs with the model in memory, and obs streamed from disk (`--offload`), whose plan is compared with the in-memory
one unit by unit; beside each, what `--dry-run` estimates for it.

  .venv/bin/python benchmarks/peak_memory.py --model smollm2 --ratio 0.5 --nsamples 128
  .venv/bin/python benchmarks/peak_memory.py --render     (--write: into BENCHMARKS.md, between its markers)

The estimate column is computed by the current formula from each row's model config and settings.

The model is the cached safetensors folder of a benchmark model (converted once from its GGUF).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MODELS, append_jsonl, command_line, fill_between, read_jsonl  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "peak_memory.jsonl"
MODES = {"flap": ("flap", False), "obs": ("obs", False), "obs --offload": ("obs", True)}


def _folder(name: str) -> Path:
    """The model's safetensors folder in the cache (--offload streams safetensors)."""
    from flap_llm.model.models import resolve_model
    path, _ = resolve_model(MODELS[name](), False)
    return Path(path)


def run(name: str, mode: str, ratio: float, nsamples: int, out: Path) -> dict:
    """The measured part, in its own process: one pruning, in memory or streamed."""
    import flap_llm
    from flap_llm.calibration.data import calibration_windows
    from flap_llm.model.models import load_model, load_tokenizer
    from flap_llm.calibration.offload import prune_offloaded

    torch.set_num_threads(2)
    folder = _folder(name)
    tok = load_tokenizer(str(folder))
    calib = calibration_windows("builtin:wiki", tok, nsamples, 128, 0)
    method, offload = MODES[mode]
    config = flap_llm.PruneConfig(ratio=ratio, method=method)
    t = time.perf_counter()
    if offload:
        result = prune_offloaded(folder, calib, config, out, tokenizer=tok, batch_size=8, progress=False)
    else:
        model, _, _ = load_model(str(folder), progress=False)
        result = flap_llm.prune(model, calib, config, batch_size=8)
    wall, peak = time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    from flap_llm.eval.evaluate import perplexity  # after the peak is read: the evaluation is not part of the run
    pruned = flap_llm.load_pruned(out) if offload else model
    ppl = perplexity(pruned, tok, "builtin:wiki", 128, 8, 48)["ppl"]
    return {"wall_s": wall, "peak_rss_bytes": peak, "timings_s": result.report["timings_s"],
            "plan": result.plan.to_dict(), "ppl_wiki_48": ppl}


def estimate_of(r: dict):
    """`--dry-run`'s estimate (flap_llm.reporting.estimate.prune_estimate) for a row's model config and settings."""
    from transformers import AutoConfig

    import flap_llm
    from flap_llm.reporting.estimate import prune_estimate
    fields = {k: v for k, v in r["config"].items() if k not in ("transformers_version", "model_type")}
    config = AutoConfig.for_model(r["config"]["model_type"], **fields)
    method, offload = MODES[r["mode"]]
    return prune_estimate(config, flap_llm.PruneConfig(ratio=r["ratio"], method=method), nsamples=r["nsamples"],
                          seqlen=r["seqlen"], batch_size=r["batch_size"], offload=offload)


def render(path: Path = RESULTS) -> str:
    out = ["| model | ratio | windows | run | peak RSS GiB | --dry-run estimate GiB | estimate / measured | wall (s) | "
           "held-out ppl (48 windows) |", "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in read_jsonl(path):
        ppl = f"{r['ppl_wiki_48']:.2f}" if r.get("ppl_wiki_48") else "–"
        est = estimate_of(r).peak_host_bytes
        out.append(f"| {r['model']} | {r['ratio']:.0%} | {r['nsamples']} | {r['mode']} | "
                   f"{r['peak_rss_bytes'] / 2**30:.2f} | {est / 2**30:.2f} | "
                   f"{est / r['peak_rss_bytes']:.2f} | {r['wall_s']:.0f} | {ppl} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2", choices=sorted(MODELS))
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--run", choices=list(MODES), help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--render", action="store_true", help="print the table of the results and exit")
    ap.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md and exit")
    args = ap.parse_args()
    if args.write:
        fill_between(Path(__file__).resolve().parent.parent / "BENCHMARKS.md", "peak memory table", render())
        return
    if args.render:
        print(render())
        return
    if args.run:
        print(json.dumps(run(args.model, args.run, args.ratio, args.nsamples, Path(args.out))))
        return
    _folder(args.model)  # converted once, outside the measured processes
    rows = {}
    with tempfile.TemporaryDirectory(prefix="flap-obs-offload-") as work:
        for mode in args.modes.split(","):
            proc = subprocess.run([sys.executable, __file__, "--run", mode, "--model", args.model, "--ratio",
                                   str(args.ratio), "--nsamples", str(args.nsamples), "--out", f"{work}/{mode.replace(' ', '')}"],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(proc.stderr[-4000:])
            rows[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(mode, {k: v for k, v in rows[mode].items() if k != "plan"}, flush=True)
    differ = None
    if {"obs", "obs --offload"} <= rows.keys():
        a, b = (rows[m]["plan"]["layers"] for m in ("obs", "obs --offload"))
        differ = sum(len(set(x[k]) ^ set(y[k])) for x, y in zip(a, b) for k in ("kv_heads", "channels"))
        print(f"obs plans in memory and streamed: {differ} units differ", flush=True)
    from transformers import AutoConfig

    import flap_llm
    from flap_llm.reporting.estimate import prune_estimate
    from flap_llm.reporting.report import versions
    config = AutoConfig.from_pretrained(_folder(args.model))
    for mode, r in rows.items():
        method, offload = MODES[mode]
        est = prune_estimate(config, flap_llm.PruneConfig(ratio=args.ratio, method=method), nsamples=args.nsamples,
                             seqlen=128, batch_size=8, offload=offload)
        print(f"{mode}: measured {r['peak_rss_bytes'] / 2**30:.2f} GiB, estimated {est.peak_host_bytes / 2**30:.2f} GiB",
              flush=True)
        append_jsonl(RESULTS, {"model": args.model, "ratio": args.ratio, "nsamples": args.nsamples, "seqlen": 128,
                               "batch_size": 8, "mode": mode, "config": config.to_dict(),
                               "estimate_peak_host_bytes": est.peak_host_bytes,
                               "wall_s": r["wall_s"], "peak_rss_bytes": r["peak_rss_bytes"], "ppl_wiki_48": r["ppl_wiki_48"],
                               "timings_s": r["timings_s"], "obs_units_differing_streamed": differ,
                               "versions": versions(), "command": command_line()})


if __name__ == "__main__":
    main()
