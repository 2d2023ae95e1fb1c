"""The obs ablation: FLAP, FLAP + lsq, and method obs with each of its parts on and off, at several ratios:
perplexity on held-out Wikipedia and on a second domain (books), zero-shot accuracy, and pruning time, every
row on the same calibration windows, side by side in one run.

Each finished row is appended to a JSONL file (stop and resume at will); `--render` prints the tables.

  .venv/bin/python benchmarks/obs.py --model smollm2 --ratios 0.2,0.5 --zs-limit 20
  .venv/bin/python benchmarks/obs.py --render

`--timing` only times: FLAP + lsq and obs pruned alternately (`--repeats` times each, side by side), with
each run's sections, and whether obs's plan is the one its quality row above (same model, ratio and `--seed`)
recorded; `--render-timing`.
"""

from __future__ import annotations

import argparse
import copy
import functools
import hashlib
import json
import sys
import time
from itertools import islice
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import flap_llm  # noqa: E402
from common import MODELS, append_jsonl, command_line, commands_of, load, read_jsonl  # noqa: E402
from flap_llm.calibration.data import calibration_windows  # noqa: E402
from flap_llm.eval.evaluate import perplexity  # noqa: E402
from flap_llm.reporting.report import versions  # noqa: E402
from flap_llm.eval.zeroshot import SOURCES, TASKS, evaluate_zeroshot  # noqa: E402

# name -> PruneConfig fields (besides ratio)
ALL = {"fisher_fraction": 1.0}  # the rows measured before obs's Fisher came from half the windows
FIT = {"allocation": "measured"}  # the rows measured before the held-out allocation (the default since)
ONE_RIDGE = {"select_damp": 0.1}  # the rows at lsq_damp 0.1 measured before the greedy chose at its own ridge
# the tasks whose answers are read off the question, not a yes/no lean (see boolq_by_lean)
WITHOUT_BOOLQ = tuple(t for t in TASKS if t != "boolq")
ROWS = {
    "flap": {},
    "flap+lsq": {"compensation": "lsq"},
    "flap+lsq damp 0.1": {"compensation": "lsq", "lsq_damp": 0.1},  # FLAP+lsq with obs's ridge
    "flap+lsq UL-UM": {"compensation": "lsq", "structure": "UL-UM"},
    # the parts, each at FLAP+lsq's ridge (0.01)
    "+selection": {"method": "obs", "allocation": "structure", "sequential": False, "lsq_damp": 0.01, **ALL},
    "+selection UL-UM": {"method": "obs", "allocation": "structure", "structure": "UL-UM", "sequential": False,
                         "lsq_damp": 0.01, **ALL},
    "+allocation": {"method": "obs", "selection": "metric", "sequential": False, "lsq_damp": 0.01, **ALL, **FIT},
    "obs non-sequential": {"method": "obs", "sequential": False, "lsq_damp": 0.01, **ALL, **FIT},
    "obs damp 0.01": {"method": "obs", "lsq_damp": 0.01, **ALL, **FIT},  # both parts, sequential
    # sequential, lsq_damp 0.1, the Fisher from every window
    "obs fisher 1.0": {"method": "obs", **ALL, **FIT, **ONE_RIDGE},
    # sequential, lsq_damp 0.1, the Fisher from half the windows: obs's default before held-out allocation
    "obs": {"method": "obs", **FIT, **ONE_RIDGE},
    # the same with held-out curves: the default before the greedy chose at its own ridge
    "obs held-out": {"method": "obs", "allocation": "held-out", **ONE_RIDGE},
    # the refit pass's greedy choosing at a ridge of 0.01 (the refit keeps 0.1): the default
    "obs select 0.01": {"method": "obs", "allocation": "held-out", "select_damp": 0.01},
    # rows 'obs token 16', 'obs token 16 shrunk', 'obs token 16 allocated' measured the deleted token_windows
    # option (results kept in benchmarks/results/obs_seeds.jsonl; BENCHMARKS.md)
}


# options a row may name with the value obs has fixed since (dropped), and the options deleted since: a row that
# needs one of them is history (its results stay in the results files and BENCHMARKS.md) and no longer runs
FIXED_SINCE = {"select_damp": 0.01, "fisher_fraction": 0.5, "sequential": True, "selection": "obs"}
DELETED = {"selection", "sequential", "fisher_fraction", "select_damp", "token_windows", "token_shrink",
           "token_reference", "structure"}


def config_of(name: str, ratio: float) -> flap_llm.PruneConfig:
    """The PruneConfig of a row at a ratio; refused for a row that measured an option deleted since."""
    row = {k: v for k, v in ROWS[name].items() if not (ROWS[name].get("method") == "obs" and FIXED_SINCE.get(k, ...) == v)}
    gone = sorted(k for k in row if row.get("method") == "obs" and k in DELETED)
    if gone or row.get("allocation") == "structure":
        raise SystemExit(f"row {name!r} measured obs options deleted since ({', '.join(gone) or 'allocation structure'}); "
                         "its results are history (BENCHMARKS.md)")
    return flap_llm.PruneConfig(ratio=ratio, **row)


def plan_digest(plan) -> str:
    """A fingerprint of the exact units a plan keeps (rows with equal digests pruned the same model)."""
    return hashlib.sha256(json.dumps(plan.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def same_plan(before: dict | None, kept: list, digest: str) -> bool | None:
    """Whether a timing run's plan is its quality row's: by the units kept where that row recorded them
    (`plan_sha`), else by the per-layer counts only (rows measured before the digest was recorded)."""
    if before is None:
        return None
    return before["plan_sha"] == digest if "plan_sha" in before else before["kept_per_layer"] == kept


def seed_of(row: dict) -> int:
    """The calibration draw a row was pruned from (rows from before `--seed` are draw 0)."""
    return row.get("seed", 0)


def gap_ratio(ppl: float, ref: float, dense: float | None) -> str:
    """(ppl − dense) / (FLAP + lsq's ppl − dense), or "–" without a dense row."""
    return "–" if dense is None else f"{(ppl - dense) / (ref - dense):.3f}"


def zeroshot_on(row: dict, limit: int) -> float | None:
    """A row's zero-shot average on the first `limit` examples of each task: its own where it scored that many,
    else read off its per-example answers where it scored more (the first examples are the same ones)."""
    zs = row.get("zeroshot")
    if not zs or row["zeroshot_avg"] is None or row["zs_limit"] < limit:
        return None
    if row["zs_limit"] == limit:
        return row["zeroshot_avg"]
    if "correct" not in zs[TASKS[0]]:
        return None
    return sum(sum(zs[t]["correct"][:limit]) / limit for t in TASKS) / len(TASKS)


def with_extra(rows: list[dict], extra: list[Path]) -> list[dict]:
    """The table's rows and, from the `extra` files, the rows of the tables' calibration draw (seed 0) of a
    model, ratio and name the table lacks (each once, from the first file that has it)."""
    have = {(r["model"], r["ratio"], r["name"]) for r in rows}
    out = list(rows)
    for r in (r for p in extra for r in read_jsonl(p)):
        key = (r["model"], r["ratio"], r["name"])
        if seed_of(r) == 0 and key not in have and r["name"] in ROWS:
            have.add(key)
            out.append(r)
    return out


def render(results: Path, extra: list[Path] = ()) -> str:
    """The ablation tables of `results`, with the rows of the tables' draw that only `extra` files hold (their
    zero-shot on the table's number of examples per task, from their per-example answers)."""
    own = read_jsonl(results)
    rows = with_extra(own, list(extra))
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        dense = next((r for r in mine if r["name"] == "dense"), None)
        out.append(f"#### {model}\n")
        if dense:
            out.append(f"Dense: wiki {dense['ppl_wiki']:.2f}, books {dense['ppl_books']:.2f}"
                       + (f", zero-shot avg {100 * dense['zeroshot_avg']:.1f}" if dense["zeroshot_avg"] is not None
                          else "") + ".")
        limits = sorted({r["zs_limit"] for r in own if r["model"] == model and r["zeroshot_avg"] is not None})
        out.append(f"Zero-shot on the first {' or '.join(map(str, limits))} examples of each task.\n" if limits else "")
        out += ["| ratio | row | removed | wiki ppl | gap / FLAP+lsq gap | books ppl | zero-shot avg | prune (s) | "
                "prune / FLAP+lsq |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
        for ratio in sorted({r["ratio"] for r in mine if r["name"] != "dense"}):
            at = [r for r in mine if r["ratio"] == ratio and r["name"] != "dense"]
            ref = next((r for r in at if r["name"] == "flap+lsq"), None)
            for r in sorted(at, key=lambda r: list(ROWS).index(r["name"])):
                gap = gap_ratio(r["ppl_wiki"], ref["ppl_wiki"], dense and dense["ppl_wiki"]) if ref else "–"
                avg = zeroshot_on(r, min(limits)) if limits else None
                zs = f"{100 * avg:.1f}" if avg is not None else "–"
                speed = f"{r['prune_s'] / ref['prune_s']:.2f}" if ref else "–"
                out.append(f"| {ratio:.0%} | {r['name']} | {r['removed_decoder']:.1%} | {r['ppl_wiki']:.2f} | {gap} | "
                           f"{r['ppl_books']:.2f} | {zs} | {r['prune_s']:.0f} | {speed} |")
        out.append("\n" + commands_of(mine) + f"  \nVersions: `{json.dumps(mine[0]['versions'])}`\n")
    return "\n".join(out)


def render_timing(results: Path) -> str:
    rows = read_jsonl(results)
    out = ["| model | ratio | obs row (its lsq_damp) | FLAP+lsq (s) | obs (s) | obs / FLAP+lsq | obs: Fisher pass / covariances "
           "and paths / refit (s) | obs plan = its quality row's |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lsq, obs = r["flap+lsq_s"], r["obs_s"]
        sec = r["obs_timings_s"][-1]
        out.append(f"| {r['model']} | {r['ratio']:.0%} | {r.get('obs_row', 'obs')} ({r['obs_lsq_damp']}) | {' / '.join(f'{t:.0f}' for t in lsq)} | "
                   f"{' / '.join(f'{t:.0f}' for t in obs)} | {sum(obs) / sum(lsq):.2f} | {sec['sensitivity']:.0f} / "
                   f"{sec['statistics']:.0f} / {sec['compensation']:.0f} | {r['same_plan_as_quality_row']} |")
    out.append("\n" + commands_of(rows))
    return "\n".join(out)


def points(p: dict) -> str:
    """A paired difference and its standard error in points, signed ("+0.0" where it rounds to zero)."""
    return f"{round(100 * p['diff'], 1) + 0.0:+.1f} ± {100 * p['se']:.1f}"


@functools.lru_cache
def _boolq_golds(limit: int) -> tuple[int, ...]:
    """The gold answers (1 = yes) of the first `limit` BoolQ examples the zero-shot subsets score."""
    return tuple(d["gold"] for d in islice(SOURCES["boolq"](), limit))


def _boolq_yes_share(limit: int) -> float:
    """The share of "yes" answers among the first `limit` BoolQ examples the zero-shot subsets score."""
    golds = _boolq_golds(limit)
    return sum(golds) / len(golds)


def render_zeroshot(paths: list[Path]) -> str:
    """Per-task zero-shot accuracy of every row that has it, with the average and the average without BoolQ
    (whose first examples are mostly "yes": a model that always answers one way scores that share or its
    complement there)."""
    rows = [r for p in paths for r in read_jsonl(p) if r.get("zeroshot")]
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        for limit in sorted({r["zeroshot"]["limit"] for r in rows if r["model"] == model}):
            mine = [r for r in rows if r["model"] == model and r["zeroshot"]["limit"] == limit]
            out += [f"#### {model}, first {limit} examples per task (BoolQ: {_boolq_yes_share(limit):.0%} of them "
                    "answer yes)\n",
                    "| ratio | row | " + " | ".join(TASKS) + " | average | average without boolq |",
                    "|---:|---|" + "---:|" * (len(TASKS) + 2)]
            for r in sorted(mine, key=lambda r: (r["ratio"], list(ROWS).index(r["name"]) if r["name"] in ROWS else -1)):
                acc = {t: r["zeroshot"][t]["acc"] for t in TASKS}
                rest = [acc[t] for t in WITHOUT_BOOLQ]
                cells = [f"{100 * a:.0f}" for a in acc.values()]
                if "correct" in r["zeroshot"]["boolq"]:
                    correct = r["zeroshot"]["boolq"]["correct"]
                    cells[0] += (f" (answered yes: {boolq_says_yes(correct):.0%}; by that lean alone: "
                                 f"{100 * boolq_by_lean(correct):.0f})")
                out.append(f"| {r['ratio']:.0%} | {r['name']} | " + " | ".join(cells)
                           + f" | {100 * sum(acc.values()) / len(acc):.1f} | {100 * sum(rest) / len(rest):.1f} |")
            out.append("")
    return "\n".join(out)


def quality_rows(rows: list[dict], name: str, seed: int) -> dict[tuple[str, float], dict]:
    """The quality rows named `name` pruned from calibration draw `seed` (rows without one are seed 0), by
    model and ratio: what a timing run's plan is compared with."""
    return {(r["model"], r["ratio"]): r for r in rows if r["name"] == name and seed_of(r) == seed}


def timing(args, model, calib) -> None:
    """Prune with FLAP + lsq and with obs (or the row `--timing-row`) alternately; record the wall times and
    obs's sections."""
    quality = quality_rows(read_jsonl(Path(args.results)), args.timing_row, args.seed)
    for ratio in (float(r) for r in args.ratios.split(",")):
        times = {"flap+lsq": [], "obs": []}
        sections, kept, digest = [], None, None
        for _ in range(args.repeats):
            for name in ("flap+lsq", "obs"):
                m = copy.deepcopy(model)
                t = time.perf_counter()
                result = flap_llm.prune(m, calib, config_of(name if name == "flap+lsq" else args.timing_row, ratio),
                                        batch_size=args.batch_size)
                times[name].append(time.perf_counter() - t)
                if name == "obs":
                    sections.append(result.report["timings_s"])
                    kept, digest = result.report["layers"]["per_layer"], plan_digest(result.plan)
                del m
        before = quality.get((args.model, ratio))
        row = {"model": args.model, "ratio": ratio, **({"seed": args.seed} if args.seed else {}),
               "flap+lsq_s": times["flap+lsq"], "obs_s": times["obs"],
               "obs_timings_s": sections, "obs_lsq_damp": config_of(args.timing_row, 0.5).options.lsq_damp,
               **({} if args.timing_row == "obs" else {"obs_row": args.timing_row}),
               "same_plan_as_quality_row": same_plan(before, kept, digest), "obs_kept_per_layer": kept,
               "obs_plan_sha": digest, "versions": versions(),
               "command": command_line()}
        append_jsonl(Path(args.timing_results), row)
        print(f"{args.model} {ratio}: flap+lsq {times['flap+lsq']} obs {times['obs']} "
              f"({sum(times['obs']) / sum(times['flap+lsq']):.2f}x)", flush=True)


def _measure(m, tok, args, name: str) -> dict:
    ppl = {d: perplexity(m, tok, d, 128, args.batch_size, args.eval_limit)["ppl"]
           for d in ("builtin:wiki", "builtin:books")}
    zs = (evaluate_zeroshot(m, tok, TASKS, args.zs_limit, args.batch_size, per_example=args.zs_per_example)
          if args.zs_limit and name in args.zs_rows.split(",") else None)
    return {"ppl_wiki": ppl["builtin:wiki"], "ppl_books": ppl["builtin:books"],
            "zeroshot_avg": None if zs is None else zs["average"], "zeroshot": zs}


def paired(mine: dict, ref: dict, n: int, tasks: tuple[str, ...] | list[str] = TASKS) -> dict:
    """Two rows' zero-shot answers on the first `n` examples of each of `tasks`: both averages, the mean
    difference with its standard error (the paired one: each task's mean of per-example differences, variances
    summed over the tasks), and the examples only one of the two got right."""
    avg, ref_avg, diff, var, only_mine, only_ref = 0.0, 0.0, 0.0, 0.0, 0, 0
    for t in tasks:
        a, b = mine["zeroshot"][t]["correct"][:n], ref["zeroshot"][t]["correct"][:n]
        if len(a) < n or len(b) < n:
            raise SystemExit(f"{mine['name']} or {ref['name']} scored fewer than {n} examples of {t}")
        avg += sum(a) / n / len(tasks)
        ref_avg += sum(b) / n / len(tasks)
        d = [x - y for x, y in zip(a, b)]
        mean = sum(d) / n
        diff += mean / len(tasks)
        var += sum((x - mean) ** 2 for x in d) / (n - 1) / n / len(tasks) ** 2
        only_mine += sum(x > 0 for x in d)
        only_ref += sum(x < 0 for x in d)
    return {"avg": avg, "ref_avg": ref_avg, "diff": diff, "se": var ** 0.5,
            "only_mine": only_mine, "only_ref": only_ref}


def boolq_says_yes(correct: list[int]) -> float:
    """The share of "yes" answers given on the first BoolQ examples, from whether each answer was right (a right
    answer is the gold one, a wrong one the other): how far a model leans one way."""
    golds = _boolq_golds(len(correct))
    return sum(g if right else 1 - g for g, right in zip(golds, correct)) / len(correct)


def boolq_by_lean(correct: list[int]) -> float:
    """The BoolQ accuracy a model would get on the same first examples by answering yes at random with its own
    yes share, whatever the question (y g + (1 - y)(1 - g) for yes share y and gold yes share g): accuracy
    above it is what the answers owe to the passages, not to the lean."""
    y, g = boolq_says_yes(correct), _boolq_yes_share(len(correct))
    return y * g + (1 - y) * (1 - g)


def render_paired(results: Path) -> str:
    """Every row with per-example zero-shot answers against FLAP + lsq's at the same ratio, on the first 20, 50,
    ... examples per task (the quality tables' subsets are prefixes of the larger ones)."""
    rows = [r for r in read_jsonl(results) if r.get("zeroshot") and "correct" in r["zeroshot"]["boolq"]]
    out = ["| model | ratio | row | examples per task | row avg | FLAP+lsq avg | difference ± s.e. (paired) | "
           "right only in row / only in FLAP+lsq | without BoolQ: difference ± s.e. | "
           "BoolQ answered yes: row / FLAP+lsq |",
           "|---|---:|---|---:|---:|---:|---|---|---|---|"]
    for r in rows:
        ref = next((q for q in rows if (q["model"], q["ratio"], q["name"]) == (r["model"], r["ratio"], "flap+lsq")),
                   None)
        if ref is None or r is ref:
            continue
        limit = min(r["zeroshot"]["limit"], ref["zeroshot"]["limit"])
        for n in sorted({k for k in (20, 50, 100) if k < limit} | {limit}):
            p, q = paired(r, ref, n), paired(r, ref, n, WITHOUT_BOOLQ)
            out.append(f"| {r['model']} | {r['ratio']:.0%} | {r['name']} | {n} | {100 * p['avg']:.1f} | "
                       f"{100 * p['ref_avg']:.1f} | {points(p)} | "
                       f"{p['only_mine']} / {p['only_ref']} | {points(q)} | "
                       f"{boolq_says_yes(r['zeroshot']['boolq']['correct'][:n]):.0%} / "
                       f"{boolq_says_yes(ref['zeroshot']['boolq']['correct'][:n]):.0%} |")
    out.append("\n" + commands_of(rows))
    return "\n".join(out)


def _mean_answers(rows: list[dict], n: int) -> dict:
    """A row whose answer to each of the first `n` examples per task is the share of `rows` that got it right."""
    return {"name": rows[0]["name"], "zeroshot": {t: {"correct": [
        sum(c) / len(rows) for c in zip(*(r["zeroshot"][t]["correct"][:n] for r in rows))]} for t in TASKS}}


def render_seeds(paths: list[Path], n: int) -> str:
    """Every row with per-example zero-shot answers, against FLAP + lsq's from the same calibration draw (`seed`;
    rows without one are seed 0), paired on the first `n` examples per task: one line per draw, and the mean over
    the draws of each model, ratio and row pruned from more than one. A row repeated in a later file (the same
    model, ratio, name and draw: the same plan, scored on more or fewer examples) is shown once, from the first."""
    every = [r for p in paths for r in read_jsonl(p)]
    rows, seen = [], set()
    for r in every:
        key = (r["model"], r["ratio"], r["name"], seed_of(r))
        if r.get("zeroshot") and "correct" in r["zeroshot"]["boolq"] and key not in seen:
            seen.add(key)
            rows.append(r)
    dense = {r["model"]: r["ppl_wiki"] for r in every if r["name"] == "dense"}
    refs = {(r["model"], r["ratio"], seed_of(r)): r for r in rows if r["name"] == "flap+lsq"}
    groups: dict[tuple, list[tuple[dict, dict]]] = {}  # (model, ratio, row) -> [(row, its FLAP + lsq)] per draw
    for r in sorted(rows, key=lambda r: (r["model"], r["ratio"], r["name"], seed_of(r))):
        ref = refs.get((r["model"], r["ratio"], seed_of(r)))
        if ref is not None and r is not ref:
            groups.setdefault((r["model"], r["ratio"], r["name"]), []).append((r, ref))
    out = [f"| model | ratio | row | calibration seed | wiki ppl: row / FLAP+lsq | gap / FLAP+lsq gap | "
           f"books ppl: row / FLAP+lsq | "
           f"zero-shot avg, {n}/task: row / FLAP+lsq | difference ± s.e. (paired) | without BoolQ | "
           "BoolQ answered yes: row / FLAP+lsq |", "|---|---:|---|---:|---|---:|---|---|---|---|---|"]
    for r, ref in (pair for pairs in groups.values() for pair in pairs):
        p, q = paired(r, ref, n), paired(r, ref, n, WITHOUT_BOOLQ)
        gap = gap_ratio(r["ppl_wiki"], ref["ppl_wiki"], dense.get(r["model"]))
        out.append(f"| {r['model']} | {r['ratio']:.0%} | {r['name']} | {seed_of(r)} | "
                   f"{r['ppl_wiki']:.2f} / {ref['ppl_wiki']:.2f} | {gap} | {r['ppl_books']:.2f} / {ref['ppl_books']:.2f} | "
                   f"{100 * p['avg']:.1f} / {100 * p['ref_avg']:.1f} | {points(p)} | {points(q)} | "
                   f"{boolq_says_yes(r['zeroshot']['boolq']['correct'][:n]):.0%} / "
                   f"{boolq_says_yes(ref['zeroshot']['boolq']['correct'][:n]):.0%} |")
    for (model, ratio, name), pairs in groups.items():
        if len(pairs) < 2:  # the mean is over several draws
            continue
        # each example's answers averaged over the draws (the same examples in every draw): the paired standard
        # error of those averages counts the examples, not the draws, as the samples
        # perplexities: the means over the draws, and the gap of the mean perplexities
        k = len(pairs)
        avg = [_mean_answers([pair[j] for pair in pairs], n) for j in (0, 1)]
        p, q = paired(*avg, n), paired(*avg, n, WITHOUT_BOOLQ)
        wiki, books = ([sum(pair[j][key] for pair in pairs) / k for j in (0, 1)] for key in ("ppl_wiki", "ppl_books"))
        out.append(f"| {model} | {ratio:.0%} | {name} | mean of {k} | {wiki[0]:.2f} / {wiki[1]:.2f} | "
                   f"{gap_ratio(*wiki, dense.get(model))} | {books[0]:.2f} / {books[1]:.2f} | "
                   f"{100 * p['avg']:.1f} / {100 * p['ref_avg']:.1f} | {points(p)} | {points(q)} | |")
    out.append("\n" + commands_of([r for pairs in groups.values() for pair in pairs for r in pair]))
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2", choices=sorted(MODELS))
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--ratios", default="0.2,0.3,0.5")
    ap.add_argument("--only", default=None, help="comma-separated row names (default: all of ROWS)")
    ap.add_argument("--eval-limit", type=int, default=48)
    ap.add_argument("--zs-limit", type=int, default=20, help="zero-shot examples per task (0 = skip)")
    ap.add_argument("--zs-rows", default="dense,flap,flap+lsq,obs,obs held-out", help="rows that get zero-shot (comma-separated)")
    ap.add_argument("--zs-per-example", action="store_true",
                    help="record each zero-shot answer (right or wrong), for --render-paired")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0, help="which calibration windows (every table's rows: 0)")
    ap.add_argument("--results", default="benchmarks/results/obs.jsonl")
    ap.add_argument("--render", action="store_true")
    ap.add_argument("--render-with", nargs="+", default=[], metavar="JSONL",
                    help="--render: also the rows of the tables' draw that only these files hold")
    ap.add_argument("--timing", action="store_true", help="only time FLAP+lsq against obs, alternately")
    ap.add_argument("--repeats", type=int, default=2, help="--timing: runs of each")
    ap.add_argument("--timing-row", default="obs select 0.01", help="--timing: the obs row to time against FLAP+lsq")
    ap.add_argument("--timing-results", default="benchmarks/results/obs_timing.jsonl")
    ap.add_argument("--render-timing", action="store_true")
    ap.add_argument("--render-seeds", nargs="+", default=None, metavar="JSONL",
                    help="each row's zero-shot answers against FLAP + lsq's from the same calibration seed")
    ap.add_argument("--paired-n", type=int, default=50, help="--render-seeds: examples per task compared")
    ap.add_argument("--render-zeroshot", nargs="+", default=None, metavar="JSONL",
                    help="print per-task zero-shot accuracy of the rows in these result files")
    ap.add_argument("--render-paired", action="store_true",
                    help="compare each row's zero-shot answers with FLAP + lsq's, example by example (--results)")
    args = ap.parse_args()
    if args.render_zeroshot:
        print(render_zeroshot([Path(p) for p in args.render_zeroshot]))
        return
    if args.render_seeds:
        print(render_seeds([Path(p) for p in args.render_seeds], args.paired_n))
        return
    if args.render_paired:
        print(render_paired(Path(args.results)))
        return
    if args.render:
        print(render(Path(args.results), [Path(p) for p in args.render_with]))
        return
    if args.render_timing:
        print(render_timing(Path(args.timing_results)))
        return
    torch.manual_seed(0)
    results = Path(args.results)
    # a row per model, name, ratio and calibration seed; one dense row whatever the seed
    done = {(r["model"], r["name"], r["ratio"], 0 if r["name"] == "dense" else seed_of(r))
            for r in read_jsonl(results)}
    model, tok, _ = load(args.model)
    calib = calibration_windows("builtin:wiki", tok, args.nsamples, args.seqlen, args.seed)
    if args.timing:
        if args.timing_row not in ROWS or ROWS[args.timing_row].get("method") != "obs":
            raise SystemExit(f"--timing-row must name an obs row of {list(ROWS)}")
        timing(args, model, calib)
        return
    names = args.only.split(",") if args.only else list(ROWS)
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; choose from {list(ROWS)}")
    plan = [("dense", 0.0)] + [(n, float(r)) for r in args.ratios.split(",") for n in names]
    common = {"model": args.model, "seed": args.seed, "nsamples": args.nsamples, "seqlen": args.seqlen,
              "eval_limit": args.eval_limit, "zs_limit": args.zs_limit, "versions": versions(), "command": command_line()}
    for name, ratio in plan:
        if (args.model, name, ratio, 0 if name == "dense" else args.seed) in done:  # dense: no calibration
            continue
        m = copy.deepcopy(model)
        report, digest, t = None, None, time.perf_counter()
        if name != "dense":
            result = flap_llm.prune(m, calib, config_of(name, ratio),
                                    batch_size=args.batch_size)
            report, digest = result.report, plan_digest(result.plan)
        prune_s = time.perf_counter() - t
        row = {**common, "name": name, "ratio": ratio, "config": ROWS.get(name, {}), "prune_s": prune_s,
               "timings_s": report["timings_s"] if report else None,
               "removed_decoder": report["params"]["decoder_removed_fraction"] if report else 0.0,
               "kept_per_layer": report["layers"]["per_layer"] if report else None, "plan_sha": digest,
               **_measure(m, tok, args, name)}
        append_jsonl(results, row)
        print(f"{args.model} {name} {ratio}: wiki {row['ppl_wiki']:.2f} books {row['ppl_books']:.2f} "
              f"prune {prune_s:.0f}s", flush=True)
        del m


if __name__ == "__main__":
    main()
