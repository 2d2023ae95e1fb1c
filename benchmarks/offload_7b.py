"""Models larger than memory: prune a random-weight LLaMA with Llama-2-7B's shapes (bf16 safetensors,
about 13.5 GB on disk) at 20% with --offload-style layer streaming, and record wall time and peak RSS.

  .venv/bin/python benchmarks/offload_7b.py --workdir /tmp/flap-7b

The model is generated once into WORKDIR/src (layer by layer, so generating needs little memory either);
pruning runs in a fresh process whose peak RSS (ru_maxrss) is reported.
"""

from __future__ import annotations

import argparse
import json
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHAPES, random_checkpoint  # noqa: E402


def make_model(folder: Path, layers: int) -> None:
    """Random bf16 weights of Llama-2-7B's shapes, shard by shard (one decoder layer per shard)."""
    random_checkpoint(folder, SHAPES["llama-2-7b"], layers)


def run(src: Path, out: Path, nsamples: int, seqlen: int, ratio: float) -> None:
    """The measured part, in its own process."""
    import flap_llm
    from flap_llm.calibration.offload import prune_offloaded

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 32000, (nsamples, seqlen), generator=g)
    t = time.perf_counter()
    result = prune_offloaded(src, ids, flap_llm.PruneConfig(ratio=ratio), out, batch_size=8, progress=True,
                             overwrite=True)
    wall = time.perf_counter() - t
    print(json.dumps({"wall_s": wall, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "timings_s": result.report["timings_s"], "params": result.report["params"],
                      "kv_groups_kept": result.report["layers"]["kv_groups_kept"],
                      "peak_layer_bytes": result.report["offload"]["peak_layer_bytes"]}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="/tmp/flap-7b")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--run", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = Path(args.workdir)
    src, out = work / "src", work / "out"
    if args.run:
        run(src, out, args.nsamples, args.seqlen, args.ratio)
        return
    t = time.perf_counter()
    make_model(src, args.layers)
    make_s = time.perf_counter() - t
    size = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    proc = subprocess.run([sys.executable, __file__, "--run", "--workdir", str(work), "--nsamples", str(args.nsamples),
                           "--seqlen", str(args.seqlen), "--ratio", str(args.ratio)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(proc.stderr[-4000:])
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    out_size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    from flap_llm.reporting.report import versions
    print(json.dumps({**res, "source_bytes": size, "output_bytes": out_size, "make_s": make_s,
                      "nsamples": args.nsamples, "seqlen": args.seqlen, "ratio": args.ratio, "layers": args.layers,
                      "versions": versions(), "command": shlex.join(["python", *sys.argv])}, indent=2))


if __name__ == "__main__":
    main()
