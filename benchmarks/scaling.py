"""How pruning's cost grows with the model: peak memory and time of FLAP, FLAP + lsq, obs and obs --offload on
random-weight LLaMA models of real shapes (SmolLM2-135M's up to Llama-2-7B's and Llama-3-8B's), a few decoder
layers each, with one plain forward pass over the same tokens as the yardstick. Every run is a fresh process
(peak RSS is per process; on CUDA also torch's peak allocated memory). The weights are random, so the numbers are
costs, not quality.

  .venv/bin/python benchmarks/scaling.py --shapes smollm2-135m,qwen2.5-0.5b,llama-2-7b,llama-3-8b --layers 2
  .venv/bin/python benchmarks/scaling.py --render     (--write: into BENCHMARKS.md, between its markers)

Per-layer costs extrapolate to the whole depth: the passes walk one layer at a time, so their time grows with
the layer count and their memory does not (except what every layer keeps: obs's Fisher sums, and with --offload
the saved inputs of the streamed Fisher).
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
from common import SHAPES, append_jsonl, command_line, fill_between, random_checkpoint, read_jsonl  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "scaling.jsonl"
METHODS = {"flap": dict(), "flap+lsq": dict(compensation="lsq"), "obs": dict(method="obs"),
           "obs --offload": dict(method="obs")}


def _peak(device: str) -> dict:
    out = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if device.startswith("cuda"):
        out["peak_device_bytes"] = torch.cuda.max_memory_allocated()
    return out


def _loading_peak(src: Path, dtype: torch.dtype) -> dict:
    """Peak RSS while loading the checkpoint in `dtype`, and its anonymous and file-backed parts at their peaks
    (/proc/self/status, sampled every 10 ms): the mapped checkpoint's pages count in RSS, but the kernel can
    drop them."""
    import threading
    from transformers import AutoModelForCausalLM

    peaks = {"RssAnon": 0, "RssFile": 0}
    done = threading.Event()

    def sample():
        while not done.is_set():
            with open("/proc/self/status") as f:
                for line in f:
                    key = line.split(":")[0]
                    if key in peaks:
                        peaks[key] = max(peaks[key], int(line.split()[1]) * 1024)
            time.sleep(0.01)

    thread = threading.Thread(target=sample)
    thread.start()
    t = time.perf_counter()
    AutoModelForCausalLM.from_pretrained(src, dtype=dtype)
    wall = time.perf_counter() - t
    time.sleep(0.05)
    done.set()
    thread.join()
    return {"wall_s": wall, "peak_anon_bytes": peaks["RssAnon"], "peak_file_bytes": peaks["RssFile"], **_peak("cpu")}


def run(src: Path, method: str, ratio: float, nsamples: int, seqlen: int, device: str, dtype: str,
        batch_size: int, out: Path) -> dict:
    """One measured run, in its own process."""
    import flap_llm
    from flap_llm.calibration.offload import prune_offloaded
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    vocab = json.loads((src / "config.json").read_text())["vocab_size"]
    ids = torch.randint(0, vocab, (nsamples, seqlen), generator=torch.Generator().manual_seed(0))
    torch_dtype = getattr(torch, dtype)
    if method == "load":  # loading alone: the resident set split into anonymous memory and mapped file pages
        return _loading_peak(src, torch_dtype)
    if method == "obs --offload":
        t = time.perf_counter()
        result = prune_offloaded(src, ids, flap_llm.PruneConfig(ratio=ratio, **METHODS[method]), out, device=device,
                                 dtype=torch_dtype, batch_size=batch_size)
        return {"wall_s": time.perf_counter() - t, "timings_s": result.report["timings_s"], **_peak(device)}
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch_dtype).to(device).eval()
    t = time.perf_counter()
    if method == "forward":
        with torch.no_grad():
            for batch in ids.split(batch_size):
                model(batch.to(device), use_cache=False)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return {"wall_s": time.perf_counter() - t, **_peak(device)}
    result = flap_llm.prune(model, ids, flap_llm.PruneConfig(ratio=ratio, **METHODS[method]), batch_size=batch_size)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return {"wall_s": time.perf_counter() - t, "timings_s": result.report["timings_s"], **_peak(device)}


def dry_run(row: dict):
    """`--dry-run`'s estimate for the row's shape, layers and settings (flap_llm.reporting.estimate.prune_estimate)."""
    import flap_llm
    from flap_llm.reporting.estimate import prune_estimate
    from transformers import LlamaConfig

    config = LlamaConfig(**{**SHAPES[row["shape"]], "num_hidden_layers": row["layers"]})
    prune = flap_llm.PruneConfig(ratio=row["ratio"], **METHODS[row["method"]])
    return prune_estimate(config, prune, nsamples=row["nsamples"], seqlen=row["seqlen"],
                          batch_size=row["batch_size"], dtype=getattr(torch, row["dtype"]), device=row["device"],
                          offload=row["method"].endswith("--offload"))


def current_rows(path: Path = RESULTS) -> list[dict]:
    """The rows of the current code (rows marked superseded were measured before a change: history)."""
    return [r for r in read_jsonl(path) if not r.get("superseded")]


def render(path: Path = RESULTS) -> str:
    """Measured rows beside the dry run's estimate of the same quantity (host on CPU rows; device on GPU rows)."""
    rows = [r for r in current_rows(path) if r["method"] != "load"]  # loading alone: quoted in the text
    out = ["| shape | layers | method | device | dtype | windows | wall (s) | / forward | peak RSS GiB | "
           "peak device GiB | --dry-run estimate GiB |", "|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|"]
    forward = {(r["shape"], r["layers"], r["device"], r["nsamples"]): r["wall_s"] for r in rows if r["method"] == "forward"}
    for r in rows:
        base = forward.get((r["shape"], r["layers"], r["device"], r["nsamples"]))
        ratio = f"{r['wall_s'] / base:.2f}" if base and r["method"] != "forward" else ""
        dev = f"{r['peak_device_bytes'] / 2**30:.2f}" if "peak_device_bytes" in r else "–"
        est = ""
        if r["method"] != "forward":
            e = dry_run(r)
            est = f"{(e.peak_device_bytes if r['device'].startswith('cuda') else e.peak_host_bytes) / 2**30:.2f}"
        out.append(f"| {r['shape']} | {r['layers']} | {r['method']} | {r['device_name']} | {r['dtype']} | "
                   f"{r['nsamples']} | {r['wall_s']:.1f} | {ratio} | {r['peak_rss_bytes'] / 2**30:.2f} | {dev} | "
                   f"{est} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--layers", type=int, default=2, help="decoder layers of each random model")
    ap.add_argument("--methods", default="forward," + ",".join(METHODS),
                    help="forward, the methods, or load (loading alone, its anonymous and file-backed peaks)")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", help="the model's dtype in the runs (the files are bf16)")
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "flap-scaling"))
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--render", action="store_true", help="print BENCHMARKS.md's table and exit")
    ap.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md and exit")
    ap.add_argument("--run", nargs=2, metavar=("SRC", "METHOD"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.render or args.write:
        if args.write:
            fill_between(Path(__file__).resolve().parent.parent / "BENCHMARKS.md", "scaling table", render(args.results))
        else:
            print(render(args.results))
        return
    if args.run:
        src, method = Path(args.run[0]), args.run[1]
        with tempfile.TemporaryDirectory(prefix="flap-scaling-out-") as out:
            print(json.dumps(run(src, method, args.ratio, args.nsamples, args.seqlen, args.device, args.dtype,
                                 args.batch_size, Path(out) / "pruned")))
        return
    from flap_llm.reporting.report import versions
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    for shape in args.shapes.split(","):
        src = random_checkpoint(Path(args.workdir) / f"{shape}-{args.layers}", SHAPES[shape], args.layers)
        for method in args.methods.split(","):
            cmd = [sys.executable, __file__, "--run", str(src), method, "--ratio", str(args.ratio), "--nsamples",
                   str(args.nsamples), "--seqlen", str(args.seqlen), "--batch-size", str(args.batch_size),
                   "--device", args.device, "--dtype", args.dtype]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{shape} {method}: failed: {proc.stderr.strip().splitlines()[-1:]}", flush=True)
                continue
            row = {"shape": shape, "layers": args.layers, "method": method, "ratio": args.ratio,
                   "nsamples": args.nsamples, "seqlen": args.seqlen, "batch_size": args.batch_size,
                   "device": args.device, "device_name": device_name, "dtype": args.dtype,
                   **json.loads(proc.stdout.strip().splitlines()[-1]), "versions": versions(),
                   "command": command_line()}
            append_jsonl(args.results, row)
            print(f"{shape} x{args.layers} {method}: {row['wall_s']:.1f}s, peak RSS "
                  f"{row['peak_rss_bytes'] / 2**30:.2f} GiB", flush=True)


if __name__ == "__main__":
    main()
