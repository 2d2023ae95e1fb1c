"""The README's three recipes, measured: each one's result on held-out Wikipedia and books, zero-shot, its time,
and (deploy) its Q4_K_M GGUF's size, llama.cpp perplexity and llama-bench speed against the dense Q4_K_M.

  paper   flap-llm prune --ratio R                                    FLAP as the paper describes it
  best    flap-llm prune --ratio R --method obs --heal-tokens N       obs, then distillation from the dense model
          (families where obs is refused: --compensation lsq instead of --method obs)
  deploy  flap-llm prune --ratio R --gguf Q4_K_M                      FLAP, widths aligned to 256, Q4_K_M file

Each row is what the command does, through the same library calls (the CLI evaluates the dense model again for
every command; here it is evaluated once per model). Rows append to a JSONL file, so a stopped run resumes;
`--render` prints the tables.

  .venv/bin/python benchmarks/recipes.py --model smollm2 --nsamples 128 --zs-limit 50 --heal-tokens 250000
  .venv/bin/python benchmarks/recipes.py --render            (BENCHMARKS.md's table; --render-summary: the README's)
  .venv/bin/python benchmarks/recipes.py --write             (both, written between their markers)
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
from common import MODELS, append_jsonl, command_line, fill_between, llama_bench, load, read_jsonl  # noqa: E402
from flap_llm.export import llamacpp  # noqa: E402
from flap_llm.calibration.data import calibration_windows, load_texts, training_windows  # noqa: E402
from flap_llm.healing.distill import HealConfig, heal  # noqa: E402
from flap_llm.errors import FlapError  # noqa: E402
from flap_llm.eval.evaluate import perplexity  # noqa: E402
from flap_llm.export import gguf_alignment  # noqa: E402
from flap_llm.reporting.report import versions  # noqa: E402
from flap_llm.eval.zeroshot import TASKS, evaluate_zeroshot  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "recipes.jsonl"
DEPLOY_TYPE = "Q4_K_M"
NAMES = {"smollm2": "SmolLM2-135M", "qwen0.5b": "Qwen2.5-Coder-0.5B", "gemma3-270m": "Gemma-3-270M"}


def _quality(model, tok, args, zeroshot: bool = True) -> dict:
    out = {f"ppl_{d.split(':')[1]}": perplexity(model, tok, d, 128, args.batch_size, args.eval_limit)["ppl"]
           for d in ("builtin:wiki", "builtin:books")}
    zs = evaluate_zeroshot(model, tok, TASKS, args.zs_limit, args.batch_size) if zeroshot and args.zs_limit else None
    return {**out, "zeroshot": zs}


def _best_config(model, ratio: float) -> tuple[flap_llm.PruneConfig, str]:
    """obs where it is offered; FLAP + lsq where obs is refused up front (Gemma 3)."""
    from flap_llm.engine import check_model
    config = flap_llm.PruneConfig(ratio=ratio, method="obs")
    try:
        check_model(model, config)
        return config, "--method obs"
    except FlapError:
        return flap_llm.PruneConfig(ratio=ratio, compensation="lsq"), "--compensation lsq"


def _row(args, recipe: str, ratio: float, command: str, **fields) -> dict:
    return {"model": args.model, "recipe": recipe, "ratio": ratio, "command": command, "nsamples": args.nsamples,
            "eval_limit": args.eval_limit, "zs_limit": args.zs_limit, **fields, "versions": versions(),
            "benchmark": command_line()}


def _deploy(args, dense, tok, calib, ratios, work: Path) -> None:
    """The dense model and each ratio as Q4_K_M files; llama-bench over all of them, interleaved, per round."""
    text = work / "eval.txt"
    text.write_text("\n\n".join(load_texts("builtin:wiki", "eval")))
    align = gguf_alignment(DEPLOY_TYPE)
    files, rows = {}, {}
    for ratio in [0.0, *ratios]:
        model, t0 = copy.deepcopy(dense), time.perf_counter()
        report = None
        if ratio:
            report = flap_llm.prune(model, calib, flap_llm.PruneConfig(ratio=ratio, align=align),
                                    batch_size=args.batch_size).report
        prune_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        path = flap_llm.save_gguf(model, work / f"{ratio}-{DEPLOY_TYPE}.gguf", tok, DEPLOY_TYPE)
        export_s = time.perf_counter() - t0
        files[ratio] = path
        rows[ratio] = {"prune_s": prune_s, "export_s": export_s, "gguf_bytes": path.stat().st_size,
                       "llama_ppl": llamacpp.perplexity(path, text, 128, args.eval_limit or -1),
                       "removed_model": report["params"]["model_removed_fraction"] if report else 0.0,
                       **_quality(model, tok, args)}
        print(f"deploy {ratio:.0%}: {rows[ratio]['gguf_bytes'] / 2**20:.0f} MiB, llama ppl "
              f"{rows[ratio]['llama_ppl']:.2f}", flush=True)
        del model
    speed = llama_bench(files, args.rounds, args.threads)
    for ratio, row in rows.items():
        row.update(speed[ratio])
        command = (f"flap-llm prune --model {NAMES[args.model]} --ratio {ratio} --gguf {DEPLOY_TYPE}" if ratio
                   else f"flap-llm export --model {NAMES[args.model]} --dtype {DEPLOY_TYPE}")
        append_jsonl(args.results, _row(args, "deploy" if ratio else "dense", ratio, command, align=align,
                                        rounds=args.rounds, threads=args.threads, **row))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2", choices=sorted(MODELS))
    ap.add_argument("--ratios", default="0.2,0.5")
    ap.add_argument("--recipes", default="deploy,paper,best", help="which to run, in this order")
    ap.add_argument("--nsamples", type=int, default=128, help="calibration windows of 128 tokens (the CLI: 1024)")
    ap.add_argument("--heal-tokens", type=int, default=250_000)
    ap.add_argument("--eval-limit", type=int, default=48, help="held-out perplexity windows of 128 tokens")
    ap.add_argument("--zs-limit", type=int, default=20, help="zero-shot examples per task")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3, help="llama-bench rounds (medians)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--render", action="store_true", help="print BENCHMARKS.md's table and exit")
    ap.add_argument("--render-summary", action="store_true", help="print the README's table and exit")
    ap.add_argument("--write", action="store_true", help="write both tables into BENCHMARKS.md and README.md")
    args = ap.parse_args()
    if args.write:
        root = Path(__file__).resolve().parent.parent
        fill_between(root / "BENCHMARKS.md", "recipes table", render(args.results))
        fill_between(root / "README.md", "recipes summary", render_summary(args.results))
        return
    if args.render or args.render_summary:
        print(render(args.results) if args.render else render_summary(args.results))
        return
    torch.manual_seed(0)
    ratios = [float(r) for r in args.ratios.split(",")]
    done = {(r["recipe"], r["ratio"]) for r in read_jsonl(args.results) if r["model"] == args.model}
    dense, tok, _ = load(args.model)
    calib = calibration_windows("builtin:wiki", tok, args.nsamples, 128, 0)
    for recipe in args.recipes.split(","):
        todo = [r for r in ratios if (recipe, r) not in done]
        if recipe == "deploy":  # the dense file is measured in the same rounds, so it is written again
            from flap_llm.export.gguf_file import check_exportable
            try:
                check_exportable(dense, DEPLOY_TYPE)
            except FlapError as e:  # a family GGUF cannot express: the table says so, beside the dense model
                if ("deploy", 0.0) not in done:
                    append_jsonl(args.results, _row(args, "deploy", 0.0, f"--gguf {DEPLOY_TYPE}", refused=str(e)))
                print(f"{args.model} deploy: refused ({e})", flush=True)
                if ("dense", 0.0) not in done:
                    append_jsonl(args.results, _row(args, "dense", 0.0, f"--model {NAMES[args.model]}",
                                                    **_quality(dense, tok, args)))
                continue
            if todo:
                with tempfile.TemporaryDirectory(prefix="flap-recipes-") as work:
                    _deploy(args, dense, tok, calib, todo, Path(work))
            continue
        for ratio in todo:
            model, t0 = copy.deepcopy(dense), time.perf_counter()
            if recipe == "paper":
                config, flags = flap_llm.PruneConfig(ratio=ratio), ""
            else:
                config, flags = _best_config(model, ratio)
            report = flap_llm.prune(model, calib, config, batch_size=args.batch_size).report
            fields = {"prune_s": time.perf_counter() - t0, "config": config.to_dict(),
                      "removed_model": report["params"]["model_removed_fraction"]}
            command = f"flap-llm prune --model {NAMES[args.model]} --ratio {ratio}" + (f" {flags}" if flags else "")
            if recipe == "best":
                fields["before_heal"] = _quality(model, tok, args, zeroshot=False)
                data = training_windows("builtin:wiki", tok, -(-args.heal_tokens // 128), 128, 0)
                result = heal(model, dense, data, HealConfig(tokens=args.heal_tokens, batch_size=args.batch_size),
                              progress=True)
                fields["heal"] = result.to_dict()
                command += f" --heal-tokens {args.heal_tokens}"
            fields.update(_quality(model, tok, args))
            append_jsonl(args.results, _row(args, recipe, ratio, command, **fields))
            print(f"{args.model} {recipe} {ratio:.0%}: wiki {fields['ppl_wiki']:.2f}, books {fields['ppl_books']:.2f}",
                  flush=True)
            del model


def render(path: Path = RESULTS) -> str:
    """The headline table: model x ratio x recipe."""
    rows = read_jsonl(path)
    out = ["| model | ratio | recipe | wiki ppl | books ppl | zero-shot avg | time (s) | Q4_K_M MiB | "
           "llama.cpp ppl | pp512 / tg128 t/s (x dense) |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    order = {"dense": 0, "paper": 1, "best": 2, "deploy": 3}
    newest = {(r["model"], r["recipe"], r["ratio"]): r for r in rows}  # a rerun's rows replace the earlier ones
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = sorted((r for r in newest.values() if r["model"] == model), key=lambda r: (r["ratio"], order[r["recipe"]]))
        dense = next((r for r in mine if r["recipe"] == "dense"), None)
        for r in mine:
            if r.get("refused"):
                why = r["refused"].split("GGUF: ", 1)[-1].split(";")[0]  # the reason, without the advice
                out.append(f"| {NAMES.get(model, model)} | – | deploy | refused up front: {why} |" + " |" * 6)
                continue
            zs = r.get("zeroshot")
            avg = f"{100 * zs['average']:.1f}" if zs else "–"
            seconds = r.get("prune_s", 0) + (r["heal"]["seconds"] if "heal" in r else 0)
            what = r["recipe"]
            if "heal" in r:
                what = "best: " + ("obs" if "obs" in r["command"] else "FLAP + lsq") + f" + heal {r['heal']['tokens']:,}"
            gguf = speed = ppl_q = "–"
            if "gguf_bytes" in r:
                gguf, ppl_q = f"{r['gguf_bytes'] / 2**20:.0f}", f"{r['llama_ppl']:.2f}"
                speed = f"{r['pp512']:.0f} / {r['tg128']:.1f}"
                if dense and r is not dense:
                    speed += f" ({r['pp512'] / dense['pp512']:.2f}x / {r['tg128'] / dense['tg128']:.2f}x)"
            wiki = f"{r['ppl_wiki']:.2f}" if "ppl_wiki" in r else "–"
            books = f"{r['ppl_books']:.2f}" if "ppl_books" in r else "–"
            if "before_heal" in r:
                wiki += f" ({r['before_heal']['ppl_wiki']:.2f})"
                books += f" ({r['before_heal']['ppl_books']:.2f})"
            out.append(f"| {NAMES.get(model, model)} | {r['ratio']:.0%} | {what} | {wiki} | {books} | {avg} | "
                       f"{f'{seconds:.0f}' if r['recipe'] != 'dense' else '–'} | {gguf} | {ppl_q} | {speed} |")
    return "\n".join(out)


def render_summary(path: Path = RESULTS) -> str:
    """The README's short table: held-out wiki perplexity per recipe, and the deploy file's size and speed."""
    newest = {(r["model"], r["recipe"], r["ratio"]): r for r in read_jsonl(path)}
    out = ["| model | ratio | 1. paper FLAP | 2. best quality | 3. deploy: Q4_K_M file against the dense Q4_K_M |",
           "|---|---:|---:|---:|---|"]
    for model in dict.fromkeys(m for m, _, _ in newest):
        dense = newest.get((model, "dense", 0.0))
        refused = newest.get((model, "deploy", 0.0), {}).get("refused")
        if dense:
            size = f"{dense['gguf_bytes'] / 2**20:.0f} MiB" if "gguf_bytes" in dense else ""
            out.append(f"| {NAMES.get(model, model)} | dense | {dense['ppl_wiki']:.2f} | | {size} |")
        for ratio in sorted({r for m, _, r in newest if m == model and r}):
            paper, best, deploy = (newest.get((model, k, ratio)) for k in ("paper", "best", "deploy"))
            cells = [f"{paper['ppl_wiki']:.2f}" if paper else "–"]
            if best:
                how = "obs" if "obs" in best["command"] else "FLAP + lsq"
                cells.append(f"{best['ppl_wiki']:.2f} ({how} + heal {best['heal']['tokens'] // 1000}k)")
            else:
                cells.append("–")
            if deploy and dense and "gguf_bytes" in dense:
                cells.append(f"{deploy['gguf_bytes'] / 2**20:.0f} MiB; prompts {deploy['pp512'] / dense['pp512']:.2f}x, "
                             f"generation {deploy['tg128'] / dense['tg128']:.2f}x as fast (wiki {deploy['ppl_wiki']:.2f})")
            else:
                cells.append("not offered for this family" if refused else "–")
            out.append(f"| {NAMES.get(model, model)} | {ratio:.0%} | " + " | ".join(cells) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
