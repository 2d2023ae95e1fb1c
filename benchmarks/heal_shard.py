"""Healing replicated (DDP) against sharded (FSDP2, `--shard`) over two processes: each rank's trained weights,
gradients and optimizer state (HealResult.state_bytes), each rank's peak RSS, and tokens/s, on the same pruned
model, data and steps.

  .venv/bin/python benchmarks/heal_shard.py --model smollm2 --ratio 0.5 --tokens 8192

Each run is `torchrun --nproc-per-node 2 -m flap_llm heal` on a checkpoint pruned here first (FLAP + lsq), on
the CPU with gloo (or on GPUs with --device cuda, one per process).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MODELS, append_jsonl, command_line  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "heal_shard.jsonl"

# run by each rank: the heal CLI, then this process's peak RSS to stdout
RANK = """
import resource, sys
from flap_llm.cli import main
code = main(sys.argv[1:])
print("PEAK_RSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, flush=True)
sys.exit(code)
"""


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2", choices=sorted(MODELS))
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    from flap_llm.cli import main as cli
    from flap_llm.models import resolve_model
    from flap_llm.report import versions
    source, _ = resolve_model(MODELS[args.model](), False)
    with tempfile.TemporaryDirectory(prefix="flap-heal-shard-") as work:
        pruned = Path(work) / "pruned"
        assert cli(["prune", "--model", source, "--ratio", str(args.ratio), "--compensation", "lsq", "--nsamples",
                    "64", "--no-eval", "--quiet", "--out", str(pruned)]) == 0
        script = Path(work) / "rank.py"
        script.write_text(RANK)
        for mode in ("ddp", "shard"):
            out = Path(work) / mode
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                   str(_port()), str(script), "heal", "--model", str(pruned), "--teacher", source, "--tokens",
                   str(args.tokens), "--batch-size", str(args.batch_size), "--no-eval", "--quiet", "--device",
                   args.device, "--out", str(out)] + (["--shard"] if mode == "shard" else [])
            env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one core per process
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                sys.exit(proc.stderr[-4000:])
            peaks = [int(line.split()[1]) for line in proc.stdout.splitlines() if line.startswith("PEAK_RSS")]
            heal = json.loads((out / "heal_report.json").read_text())
            row = {"model": args.model, "prune": f"FLAP {args.ratio:.0%} + lsq", "mode": mode, "world_size": 2,
                   "device": args.device, "tokens": heal["tokens"], "steps": heal["steps"],
                   "tokens_per_s": heal["tokens_per_s"], "state_bytes_rank0": heal["state_bytes"],
                   "peak_rss_bytes": peaks, "final_loss": heal["loss"][-1], "versions": versions(),
                   "command": command_line()}
            append_jsonl(RESULTS, row)
            print(mode, {k: row[k] for k in ("tokens_per_s", "state_bytes_rank0", "peak_rss_bytes", "final_loss")},
                  flush=True)


if __name__ == "__main__":
    main()
