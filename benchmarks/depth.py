"""Depth against width at the same removed fraction: held-out perplexity before and after a short heal; with
--speed, llama.cpp's pp512 / tg128 of the f16 files against the dense file in the same interleaved rounds; with
--vllm, vLLM's batch throughput and time to first token against the dense model in the same rounds.

  depth             flap-llm prune --method depth --ratio R                     blocks by the loss without each
  FLAP              flap-llm prune --ratio R                                    the paper
  obs               flap-llm prune --method obs --ratio R                       (FLAP + lsq where obs is refused)

Rows append to results/depth.jsonl (a stopped run resumes); --render prints the table.

  .venv/bin/python benchmarks/depth.py --model smollm2 --ratios 0.2,0.35 --heal-tokens 16384
  .venv/bin/python benchmarks/depth.py --model smollm2 --speed          (the llama.cpp rounds; nothing else running)
  .venv/bin/python benchmarks/depth.py --model smollm2 --vllm           (vLLM's rounds, .venv-vllm; likewise)
  .venv/bin/python benchmarks/depth.py --render           (--write: into BENCHMARKS.md and docs/depth.md)
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import flap_llm  # noqa: E402
import flap_llm.model.plan  # noqa: E402
from common import MODELS, append_jsonl, command_line, fill_between, llama_bench, load, read_jsonl  # noqa: E402
from flap_llm.calibration.data import calibration_windows, training_windows  # noqa: E402
from flap_llm.errors import FlapError  # noqa: E402
from flap_llm.eval.evaluate import perplexity  # noqa: E402
from flap_llm.healing.distill import HealConfig, heal  # noqa: E402
from flap_llm.methods.depth import blocks_to_remove  # noqa: E402
from flap_llm.reporting.report import versions  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "depth.jsonl"
NAMES = {"smollm2": "SmolLM2-135M", "qwen0.5b": "Qwen2.5-Coder-0.5B", "gemma3-270m": "Gemma-3-270M"}
VARIANTS = ("depth-loss", "flap", "obs")  # "depth-angular" rows in depth.jsonl: a block score since removed


def config_of(variant: str, ratio: float, model) -> tuple[flap_llm.PruneConfig, str]:
    """The configuration of a variant, and its command-line flags."""
    from flap_llm.engine import check_model
    if variant == "depth-loss":
        return flap_llm.PruneConfig(ratio=ratio, method="depth"), "--method depth"
    if variant == "flap":
        return flap_llm.PruneConfig(ratio=ratio), ""
    config = flap_llm.PruneConfig(ratio=ratio, method="obs")
    try:
        check_model(model, config)
        return config, "--method obs"
    except FlapError:  # Gemma 3: obs is refused
        return flap_llm.PruneConfig(ratio=ratio, compensation="lsq"), "--compensation lsq"


def _ppl(model, tok, args) -> float:
    return perplexity(model, tok, "builtin:wiki", 128, args.batch_size, args.eval_limit)["ppl"]


def quality(args, dense, tok) -> None:
    done = {(r["variant"], r["ratio"]) for r in read_jsonl(args.results) if r["model"] == args.model and "ppl" in r}
    calib = calibration_windows("builtin:wiki", tok, args.nsamples, 128, 0)
    if ("dense", 0.0) not in done:
        append_jsonl(args.results, {"model": args.model, "variant": "dense", "ratio": 0.0, "ppl": _ppl(dense, tok, args),
                                    "eval_limit": args.eval_limit, "versions": versions(), "benchmark": command_line()})
    heal_data = training_windows("builtin:wiki", tok, -(-args.heal_tokens // 128), 128, 0) if args.heal_tokens else None
    for ratio in args.ratios:
        for variant in args.variants:
            if (variant, ratio) in done:
                continue
            model = copy.deepcopy(dense)
            config, flags = config_of(variant, ratio, model)
            t0 = time.perf_counter()
            result = flap_llm.prune(model, calib, config, batch_size=args.batch_size)
            row = {"model": args.model, "variant": variant, "ratio": ratio, "config": config.to_dict(),
                   "command": f"flap-llm prune --model {NAMES[args.model]} --ratio {ratio} {flags}".rstrip(),
                   "prune_s": time.perf_counter() - t0, "nsamples": args.nsamples, "eval_limit": args.eval_limit,
                   "removed_decoder": result.report["params"]["decoder_removed_fraction"],
                   "removed_model": result.report["params"]["model_removed_fraction"],
                   "blocks_removed": list(result.plan.dropped), "ppl": _ppl(model, tok, args)}
            if heal_data is not None:
                h = heal(model, dense, heal_data, HealConfig(tokens=args.heal_tokens, batch_size=args.batch_size),
                         progress=False)
                row.update(heal_tokens=h.tokens, heal_s=h.seconds, ppl_healed=_ppl(model, tok, args))
            row.update(versions=versions(), benchmark=command_line())
            append_jsonl(args.results, row)
            print(f"{args.model} {variant} {ratio:.0%}: removed {row['removed_decoder']:.3f}, ppl {row['ppl']:.2f}"
                  + (f", healed {row['ppl_healed']:.2f}" if "ppl_healed" in row else ""), flush=True)
            del model


def depth_model(dense, ratio: float, row: dict | None):
    """A copy of the dense model without the blocks its quality row removed, or as many in the middle: every block
    has the same shape, so the speed does not depend on which."""
    c = dense.config
    n = c.num_hidden_layers
    k = blocks_to_remove(ratio, n)
    dropped = row["blocks_removed"] if row else list(range((n - k) // 2, (n - k) // 2 + k))
    plan = flap_llm.model.plan.PrunePlan.from_dict(
        {"layers": [{"heads": [] if i in dropped else list(range(c.num_attention_heads)),
                     "kv_heads": [] if i in dropped else list(range(c.num_key_value_heads)),
                     "channels": [] if i in dropped else list(range(c.intermediate_size))} for i in range(n)],
         "dropped": dropped})
    model = copy.deepcopy(dense)
    flap_llm.apply_plan(model, plan)
    return model


def served(args, dense, tok):
    """(variant, ratio, model) of the dense model and, at each ratio, of depth (depth_model) and FLAP (MLP widths
    aligned to 32, as for deployment), one at a time."""
    quality_rows = {(r["variant"], r["ratio"]): r for r in read_jsonl(args.results)
                    if r["model"] == args.model and "ppl" in r}
    calib = calibration_windows("builtin:wiki", tok, args.nsamples, 128, 0)
    yield "dense", 0.0, dense
    for ratio in args.ratios:
        yield "depth-loss", ratio, depth_model(dense, ratio, quality_rows.get(("depth-loss", ratio)))
        model = copy.deepcopy(dense)
        flap_llm.prune(model, calib, flap_llm.PruneConfig(ratio=ratio, align=32), batch_size=args.batch_size)
        yield "flap", ratio, model


def speed(args, dense, tok) -> None:
    """f16 GGUF files of served()'s models, benchmarked in the same interleaved llama-bench rounds."""
    with tempfile.TemporaryDirectory(prefix="flap-depth-") as work:
        files, meta = {}, {}
        for variant, ratio, model in served(args, dense, tok):
            key = f"{variant}@{ratio}"
            try:
                files[key] = flap_llm.save_gguf(model, Path(work) / f"{variant}-{ratio}.gguf", tok, "f16")
            except FlapError as e:  # Gemma 3 and Qwen3: per-layer widths have no llama.cpp architecture
                print(f"{args.model} {variant} {ratio:.0%}: refused ({e})", flush=True)
                continue
            meta[key] = (variant, ratio, files[key].stat().st_size)
        measured = llama_bench(files, args.rounds, args.threads)
    for key, (variant, ratio, size) in meta.items():
        append_jsonl(args.results, {"model": args.model, "variant": variant, "ratio": ratio, "gguf": "f16",
                                    "gguf_bytes": size, **measured[key], "rounds": args.rounds,
                                    "threads": args.threads, "versions": versions(), "benchmark": command_line()})
        print(f"{args.model} {variant} {ratio:.0%}: pp512 {measured[key]['pp512']:.0f}, "
              f"tg128 {measured[key]['tg128']:.1f}", flush=True)


def vllm(args, dense, tok) -> None:
    """served()'s models in vLLM (benchmarks/vllm_speed.py's rounds): depth as the stock checkpoint (hf-uniform, the
    family's own vLLM class), FLAP as the flap checkpoint (flap-llm's plugin), fp32."""
    from vllm_speed import serve_rounds
    with tempfile.TemporaryDirectory(prefix="flap-depth-vllm-") as work:
        folders = {}
        for variant, ratio, model in served(args, dense, tok):
            if variant == "dense":  # the folder stock vLLM loads
                folders[(variant, ratio)] = args.source
                continue
            fmt = "hf-uniform" if variant == "depth-loss" else "flap"
            folders[(variant, ratio)] = flap_llm.save_pruned(model, Path(work) / f"{variant}-{ratio}", tok,
                                                             format=fmt)
            del model
        labels = {f"{v}@{r}": folder for (v, r), folder in folders.items()}
        device, med = serve_rounds(labels, tok, Path(work), rounds=args.rounds, new_tokens=64)
    for (variant, ratio) in folders:
        m = med[f"{variant}@{ratio}"]
        append_jsonl(args.results, {"model": args.model, "variant": variant, "ratio": ratio,
                                    "vllm_tokens_per_s": m["tokens_per_s"], "vllm_ttft_s": m["ttft_s"],
                                    "vllm_rounds": m["rounds"], "vllm_device": device, "rounds": args.rounds,
                                    "versions": versions(), "benchmark": command_line()})
        print(f"{args.model} {variant} {ratio:.0%}: vLLM {m['tokens_per_s']:.1f} tokens/s, "
              f"time to first token {m['ttft_s']:.3f} s", flush=True)


def render(path: Path = RESULTS) -> str:
    rows = read_jsonl(path)
    newest_q = {(r["model"], r["variant"], r["ratio"]): r for r in rows if "ppl" in r}
    newest_s = {(r["model"], r["variant"], r["ratio"]): r for r in rows if "pp512" in r}
    newest_v = {(r["model"], r["variant"], r["ratio"]): r for r in rows if "vllm_tokens_per_s" in r}
    out = ["| model | removed | method | blocks removed | wiki ppl | after heal | llama.cpp f16 pp512 / tg128 vs dense "
           "| vLLM tokens/s / time to first token vs dense |", "|---|---:|---|---|---:|---:|---|---|"]
    label = {"depth-loss": "depth", "flap": "FLAP", "obs": "obs"}
    keys = {**newest_v, **newest_s, **newest_q}
    for model in dict.fromkeys(m for m, _, _ in keys):
        dense_q, dense_s = newest_q.get((model, "dense", 0.0)), newest_s.get((model, "dense", 0.0))
        dense_v = newest_v.get((model, "dense", 0.0))
        cpp = f"{dense_s['pp512']:.0f} / {dense_s['tg128']:.1f} tokens/s" if dense_s else ""
        vllm_col = f"{dense_v['vllm_tokens_per_s']:.1f} tokens/s / {dense_v['vllm_ttft_s']:.3f} s" if dense_v else ""
        dense_ppl = f"{dense_q['ppl']:.2f}" if dense_q else "–"
        out.append(f"| {NAMES.get(model, model)} | 0 | dense | | {dense_ppl} "
                   f"| | {cpp} | {vllm_col} |")
        for ratio in sorted({r for m, _, r in keys if m == model and r}):
            for variant in VARIANTS:
                q, s = newest_q.get((model, variant, ratio)), newest_s.get((model, variant, ratio))
                v = newest_v.get((model, variant, ratio))
                if q is None and s is None and v is None:
                    continue
                name = label[variant] if variant != "obs" or q is None or "obs" in q["command"] else "FLAP + lsq"
                cpp = (f"{s['pp512'] / dense_s['pp512']:.2f}x / {s['tg128'] / dense_s['tg128']:.2f}x"
                       if s and dense_s else "")
                vllm_col = (f"{v['vllm_tokens_per_s'] / dense_v['vllm_tokens_per_s']:.2f}x / "
                            f"{dense_v['vllm_ttft_s'] / v['vllm_ttft_s']:.2f}x" if v and dense_v else "")
                fast = f"{cpp} | {vllm_col}"
                if q is None:
                    out.append(f"| {NAMES.get(model, model)} | {ratio:.0%} | {name} | | – | – | {fast} |")
                    continue
                healed = f"{q['ppl_healed']:.2f}" if "ppl_healed" in q else "–"
                blocks = ", ".join(map(str, q["blocks_removed"])) if q["blocks_removed"] else ""
                out.append(f"| {NAMES.get(model, model)} | {q['removed_decoder']:.1%} | {name} | {blocks} | "
                           f"{q['ppl']:.2f} | {healed} | {fast} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2", choices=sorted(MODELS))
    ap.add_argument("--ratios", default="0.2,0.35", type=lambda s: [float(r) for r in s.split(",")])
    ap.add_argument("--variants", default=",".join(VARIANTS), type=lambda s: s.split(","))
    ap.add_argument("--nsamples", type=int, default=64, help="calibration windows of 128 tokens")
    ap.add_argument("--heal-tokens", type=int, default=16384, help="0: no heal")
    ap.add_argument("--eval-limit", type=int, default=48, help="held-out perplexity windows of 128 tokens")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--speed", action="store_true", help="the llama.cpp rounds instead of the quality rows")
    ap.add_argument("--vllm", action="store_true", help="vLLM's rounds (its CPU build, .venv-vllm) instead")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--render", action="store_true", help="print the table")
    ap.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md and docs/depth.md")
    args = ap.parse_args()
    if args.render:
        print(render(args.results))
        return
    if args.write:
        root = Path(__file__).resolve().parent.parent
        fill_between(root / "BENCHMARKS.md", "depth table", render(args.results))
        fill_between(root / "docs" / "depth.md", "depth results", render(args.results))
        return
    torch.manual_seed(0)
    dense, tok, args.source = load(args.model)
    (vllm if args.vllm else speed if args.speed else quality)(args, dense, tok)


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
