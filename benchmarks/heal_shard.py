"""Healing replicated (DDP) against sharded (FSDP2, `--shard`) over two processes: each rank's trained weights,
gradients and optimizer state (HealResult.state_bytes), each rank's peak RSS, and tokens/s, on the same pruned
model, data and steps.

  .venv/bin/python benchmarks/heal_shard.py --model smollm2 --ratio 0.5 --tokens 8192
  python benchmarks/heal_shard.py --synthetic qwen2.5-1.5b --device cuda --nproc 2 --seqlen 1024 --tokens 131072

Each run is `torchrun --nproc-per-node N -m flap_llm heal` on a checkpoint pruned here first (FLAP + lsq), on
the CPU with gloo (or on GPUs with --device cuda, one per process). --synthetic: random weights of a real shape
(benchmarks/heal.py's shapes) healed on random tokens through `flap_llm.heal` under torchrun, for memory and
throughput only; on CUDA each rank's peak allocated GPU memory is recorded too.
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

import torch

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


# --synthetic: each rank heals the saved random student on random tokens through the API
SYNTHETIC_RANK = """
import json, resource, sys
import torch
from transformers import AutoModelForCausalLM
import flap_llm
from flap_llm.calibration import distributed
from flap_llm.healing.distill import teacher_dtype
work, device, tokens, seqlen, batch, shard = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), \\
    int(sys.argv[5]), sys.argv[6] == "shard"
distributed.init_from_env(device)
student = flap_llm.load_pruned(work + "/student", device=device)
teacher = AutoModelForCausalLM.from_pretrained(work + "/teacher", dtype=teacher_dtype(device, torch.float32)).to(device).eval()
data = torch.randint(student.config.vocab_size, (-(-tokens // seqlen), seqlen),
                     generator=torch.Generator().manual_seed(0))
if device.startswith("cuda"):
    torch.cuda.reset_peak_memory_stats()
result = flap_llm.heal(student, teacher, data, flap_llm.HealConfig(tokens=tokens, batch_size=batch, shard=shard))
out = {"rank": distributed.rank(), "tokens": result.tokens, "steps": result.steps,
       "tokens_per_s": result.tokens_per_s, "state_bytes": result.state_bytes, "final_loss": result.loss[-1],
       "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
if device.startswith("cuda"):
    out["peak_device_bytes"] = torch.cuda.max_memory_allocated()
print("RESULT", json.dumps(out), flush=True)
"""


def _synthetic(args, work: Path) -> None:
    """A random model of a real shape, pruned (FLAP + lsq) and saved with its dense teacher; then each mode under
    torchrun."""
    from heal import SHAPES as HEAL_SHAPES
    from transformers import AutoConfig, AutoModelForCausalLM

    import flap_llm
    from flap_llm.reporting.report import versions
    shape = dict(HEAL_SHAPES[args.synthetic])
    config = AutoConfig.for_model(shape.pop("model_type"), **shape)
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    teacher.save_pretrained(work / "teacher")
    calib = torch.randint(config.vocab_size, (32, args.seqlen), generator=torch.Generator().manual_seed(1))
    teacher.to(args.device)
    flap_llm.prune(teacher, calib, flap_llm.PruneConfig(ratio=args.ratio, compensation="lsq"), batch_size=8)
    flap_llm.save_pruned(teacher.cpu(), work / "student")
    del teacher
    script = work / "rank.py"
    script.write_text(SYNTHETIC_RANK)
    for mode in ("ddp", "shard"):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc), "--master-port",
               str(_port()), str(script), str(work), args.device, str(args.tokens), str(args.seqlen),
               str(args.batch_size), mode]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(args))
        if proc.returncode != 0:
            sys.exit(proc.stderr[-4000:])
        ranks = sorted((json.loads(line.split(" ", 1)[1]) for line in proc.stdout.splitlines()
                        if line.startswith("RESULT ")), key=lambda r: r["rank"])
        row = {"model": args.synthetic, "synthetic": True, "prune": f"FLAP {args.ratio:.0%} + lsq", "mode": mode,
               "world_size": args.nproc, "device": args.device, "seqlen": args.seqlen, "tokens": ranks[0]["tokens"],
               "steps": ranks[0]["steps"], "tokens_per_s": ranks[0]["tokens_per_s"],
               "state_bytes_rank0": ranks[0]["state_bytes"], "peak_rss_bytes": [r["peak_rss_bytes"] for r in ranks],
               "final_loss": ranks[0]["final_loss"], "versions": versions(), "command": command_line()}
        if "peak_device_bytes" in ranks[0]:
            row["peak_device_bytes"] = [r["peak_device_bytes"] for r in ranks]
            row["device_name"] = torch.cuda.get_device_name()
        append_jsonl(args.results, row)
        print(mode, {k: row.get(k) for k in ("tokens_per_s", "state_bytes_rank0", "peak_rss_bytes",
                                              "peak_device_bytes", "final_loss")}, flush=True)


def _env(args) -> dict:
    """One core per process on the CPU."""
    return {**os.environ, "OMP_NUM_THREADS": "1"} if args.device == "cpu" else dict(os.environ)


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
    ap.add_argument("--nproc", type=int, default=2, help="processes (on CUDA: GPUs)")
    ap.add_argument("--seqlen", type=int, default=128, help="--synthetic: training window length")
    ap.add_argument("--synthetic", help="random weights of this shape (benchmarks/heal.py's): memory and speed only")
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.nproc < 2:
        raise SystemExit("sharding splits the state over processes: --nproc must be 2 or more")
    if args.synthetic:
        with tempfile.TemporaryDirectory(prefix="flap-heal-shard-") as work:
            _synthetic(args, Path(work))
        return
    from flap_llm.cli import main as cli
    from flap_llm.model.models import resolve_model
    from flap_llm.reporting.report import versions
    source, _ = resolve_model(MODELS[args.model](), False)
    with tempfile.TemporaryDirectory(prefix="flap-heal-shard-") as work:
        pruned = Path(work) / "pruned"
        assert cli(["prune", "--model", source, "--ratio", str(args.ratio), "--compensation", "lsq", "--nsamples",
                    "64", "--no-eval", "--quiet", "--out", str(pruned)]) == 0
        script = Path(work) / "rank.py"
        script.write_text(RANK)
        for mode in ("ddp", "shard"):
            out = Path(work) / mode
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc), "--master-port",
                   str(_port()), str(script), "heal", "--model", str(pruned), "--teacher", source, "--tokens",
                   str(args.tokens), "--batch-size", str(args.batch_size), "--no-eval", "--quiet", "--device",
                   args.device, "--out", str(out)] + (["--shard"] if mode == "shard" else [])
            proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(args))
            if proc.returncode != 0:
                sys.exit(proc.stderr[-4000:])
            peaks = [int(line.split()[1]) for line in proc.stdout.splitlines() if line.startswith("PEAK_RSS")]
            heal = json.loads((out / "heal_report.json").read_text())
            row = {"model": args.model, "prune": f"FLAP {args.ratio:.0%} + lsq", "mode": mode, "world_size": args.nproc,
                   "device": args.device, "tokens": heal["tokens"], "steps": heal["steps"],
                   "tokens_per_s": heal["tokens_per_s"], "state_bytes_rank0": heal["state_bytes"],
                   "peak_rss_bytes": peaks, "final_loss": heal["loss"][-1], "versions": versions(),
                   "command": command_line()}
            append_jsonl(args.results, row)
            print(mode, {k: row[k] for k in ("tokens_per_s", "state_bytes_rank0", "peak_rss_bytes", "final_loss")},
                  flush=True)


if __name__ == "__main__":
    main()
