"""Served by vLLM (its CPU build, .venv-vllm): dense / FLAP 20% / FLAP 50% checkpoints side by side, offline batch
throughput (generated tokens/s) and time to first token, the models interleaved round by round, medians over
rounds, speedups against the dense model of the same run; beside llama.cpp's speedups for the same plans
(benchmarks/results/gguf_deploy.jsonl).

  .venv/bin/python benchmarks/vllm_speed.py --models smollm2,qwen0.5b --rounds 3
  .venv/bin/python benchmarks/vllm_speed.py --render
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import flap_llm  # noqa: E402
from common import append_jsonl, command_line, load, read_jsonl  # noqa: E402
from flap_llm.calibration.data import calibration_windows, load_texts  # noqa: E402
from flap_llm.reporting.report import versions  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "vllm_speed.jsonl"
VLLM_PYTHON = Path(os.environ.get("FLAP_VLLM_PYTHON", HERE.parent / ".venv-vllm" / "bin" / "python"))


def render(path: Path = RESULTS) -> str:
    """BENCHMARKS.md rows: the newest run of each model/ratio, with llama.cpp's f16 speedups of the same plan."""
    rows = {(r["model"], r["ratio"], r.get("align"), r["device"]): r for r in read_jsonl(path)}
    llama = {(r["model"], r["ratio"], r.get("align")): r for r in read_jsonl(HERE / "results" / "gguf_deploy.jsonl")
             if r["dtype"] == "f16"}
    out = ["| model | device | FLAP | vLLM tokens/s (batch) | speedup | time to first token s | speedup | "
           "llama.cpp f16 pp512 / tg128 speedup (CPU) |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for (model, ratio, align, device), r in sorted(rows.items(), key=lambda kv: (kv[0][3], kv[0][0], kv[0][2] or 0,
                                                                                 kv[0][1])):
        label = "dense" if not ratio else f"{ratio:.0%}" + (f", `--align {align}`" if align else "")
        ref = llama.get((model, ratio, align))
        cpp = f"{ref['speedup_pp512']:.2f} / {ref['speedup_tg128']:.2f}" if ref and ratio else ("1 / 1" if not ratio else "-")
        out.append(f"| {model} | {device} | {label} | {r['tokens_per_s']:.1f} | {r['speedup_throughput']:.2f} | {r['ttft_s']:.3f} | "
                   f"{r['speedup_ttft']:.2f} | {cpp} |")
    return "\n".join(out)


def serve_rounds(models: dict, tok, work: Path, *, rounds: int = 3, batch: int = 16, prompt_len: int = 128,
                 new_tokens: int = 128, ttft_len: int = 512, dtype: str = "float32") -> tuple[str, dict]:
    """vLLM's batch throughput and time to first token of each folder in `models` ({label: folder}), the folders
    interleaved round by round in one vLLM process (vllm_timing.py): where vLLM ran, and for each label the medians
    over the rounds (tokens_per_s, ttft_s) with the rounds themselves."""
    if not VLLM_PYTHON.exists():
        raise SystemExit(f"vLLM's environment is absent ({VLLM_PYTHON}); make it with `bash scripts/install.sh --vllm`")
    text = "\n\n".join(load_texts("builtin:wiki", "eval"))
    ids = tok(text, add_special_tokens=False).input_ids
    job = {"models": {str(label): str(folder) for label, folder in models.items()}, "rounds": rounds, "batch": batch,
           "prompt_len": prompt_len, "new_tokens": new_tokens, "ttft_len": ttft_len,
           "prompt_ids": ids[:max(batch * prompt_len, ttft_len + 64)], "dtype": dtype,
           "max_model_len": max(prompt_len + new_tokens, ttft_len + 8)}
    (work / "job.json").write_text(json.dumps(job))
    subprocess.run([str(VLLM_PYTHON), str(HERE / "vllm_timing.py"), str(work / "job.json"), str(work / "out.json")],
                   check=True)
    measured = json.loads((work / "out.json").read_text())
    per_label = measured["rounds"]
    return measured["device"], {
        label: {**{k: statistics.median(x[k] for x in per_label[str(label)]) for k in ("tokens_per_s", "ttft_s")},
                "rounds": per_label[str(label)]} for label in models}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="smollm2,qwen0.5b")
    ap.add_argument("--ratios", default="0,0.2,0.5")
    ap.add_argument("--align", type=int, default=None, help="--align for the pruned models (default: exact widths)")
    ap.add_argument("--nsamples", type=int, default=128, help="calibration windows of 128 tokens")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16, help="prompts in the throughput batch")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--ttft-len", type=int, default=512, help="prompt tokens of the time-to-first-token request")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="flap-vllm-"))
    for name in args.models.split(","):
        dense, tok, path = load(name)
        calib = calibration_windows("builtin:wiki", tok, args.nsamples, 128, 0)
        models, stats = {}, None
        for ratio in map(float, args.ratios.split(",")):
            if not ratio:
                models[ratio] = str(path)
                continue
            model = copy.deepcopy(dense)
            result = flap_llm.prune(model, calib, flap_llm.PruneConfig(ratio=ratio, align=args.align), batch_size=16,
                                    statistics=stats)
            stats = result.stats
            models[ratio] = str(flap_llm.save_pruned(model, work / f"{name}-{ratio}", tokenizer=tok))
            del model
        device, med = serve_rounds(models, tok, work, rounds=args.rounds, batch=args.batch,
                                   prompt_len=args.prompt_len, new_tokens=args.new_tokens, ttft_len=args.ttft_len,
                                   dtype=args.dtype)
        rounds = {r: med[r].pop("rounds") for r in models}
        for ratio in models:
            row = {"model": name, "ratio": ratio, "align": args.align if ratio else None, **med[ratio],
                   "speedup_throughput": med[ratio]["tokens_per_s"] / med[0.0]["tokens_per_s"],
                   "speedup_ttft": med[0.0]["ttft_s"] / med[ratio]["ttft_s"],
                   "rounds": rounds[ratio], "batch": args.batch, "prompt_len": args.prompt_len,
                   "new_tokens": args.new_tokens, "ttft_len": args.ttft_len, "dtype": args.dtype,
                   "nsamples": args.nsamples, "device": device, "command": command_line(),
                   "versions": versions()}
            append_jsonl(args.results, row)
            print(json.dumps({k: v for k, v in row.items() if k not in ("versions", "rounds")}), flush=True)


if __name__ == "__main__":
    torch.set_num_threads(2)
    if sys.argv[1:] == ["--render"]:
        print(render())
    else:
        main()
