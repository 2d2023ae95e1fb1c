"""Healing: prune (FLAP + lsq by default), then distill the dense model into the pruned one, and measure
held-out perplexity on two domains and zero-shot accuracy before and after, with healing tokens/s against the
floor (one forward+backward of the student on the same batches, timed in the same run).

  .venv/bin/python benchmarks/heal.py --model smollm2 --ratio 0.5 --tokens 250000
  .venv/bin/python benchmarks/heal.py --render

On a GPU (bf16 autocast and gradient checkpointing turn on by themselves on CUDA):
  .venv/bin/python benchmarks/heal.py --model qwen1.5b --device cuda --ratio 0.5 --tokens 2000000 --batch-size 16
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import flap_llm  # noqa: E402
from common import MODELS, append_jsonl, command_line, commands_of, load, read_jsonl, synchronize  # noqa: E402
from flap_llm.data import calibration_windows  # noqa: E402
from flap_llm.evaluate import perplexity  # noqa: E402
from flap_llm.distill import HealConfig, distill_loss, heal  # noqa: E402
from flap_llm.report import versions  # noqa: E402
from flap_llm.zeroshot import TASKS, evaluate_zeroshot  # noqa: E402


def _quality(model, tok, args) -> dict:
    out = {d: perplexity(model, tok, d, 128, args.eval_batch, args.eval_limit)["ppl"]
           for d in ("builtin:wiki", "builtin:books")}
    zs = evaluate_zeroshot(model, tok, TASKS, args.zs_limit, args.eval_batch) if args.zs_limit else None
    return {"ppl_wiki": out["builtin:wiki"], "ppl_books": out["builtin:books"],
            "zeroshot_avg": None if zs is None else zs["average"], "zeroshot": zs}


def _floor_tokens_per_s(student, data: torch.Tensor, batch_size: int, device: str, batches: int = 3) -> float:
    """One forward+backward of the student alone over `batches` batches: what healing cannot beat."""
    student.train()
    params = [p for p in student.parameters() if p.numel() > 0]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    cuda = torch.device(device).type == "cuda"
    tokens, seconds = 0, 0.0
    for i in range(batches + 1):  # the first batch warms up
        ids = data[i * batch_size:(i + 1) * batch_size].to(device)
        synchronize(device)
        t = time.perf_counter()
        with torch.autocast(torch.device(device).type, torch.bfloat16, enabled=cuda):
            logits = student(input_ids=ids, use_cache=False).logits
        loss, _ = distill_loss(logits, logits.detach(), ids, 1.0, 1.0)
        loss.backward()
        synchronize(device)
        if i:
            seconds += time.perf_counter() - t
            tokens += ids.numel()
    student.zero_grad(set_to_none=True)
    for p, f in zip(params, flags):
        p.requires_grad_(f)
    student.eval()
    return tokens / seconds


def render(results: Path) -> str:
    rows = read_jsonl(results)
    out = ["| model | prune | heal tokens | method | lr | wiki ppl before → after | books ppl before → after | "
           "zero-shot avg before → after | heal tok/s | floor tok/s | ratio | heal (s) |",
           "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        b, a = r["before"], r["after"]
        zs = (f"{100 * b['zeroshot_avg']:.1f} → {100 * a['zeroshot_avg']:.1f}" if b["zeroshot_avg"] is not None
              else "–")
        out.append(f"| {r['model']} | {r['prune']} | {r['heal']['tokens']:,} | {r['heal']['config']['method']} | "
                   f"{r['heal']['config']['lr']:g} | {b['ppl_wiki']:.2f} → {a['ppl_wiki']:.2f} "
                   f"({a['ppl_wiki'] / b['ppl_wiki']:.2f}x) | {b['ppl_books']:.2f} → {a['ppl_books']:.2f} | {zs} | "
                   f"{r['heal']['tokens_per_s']:.0f} | {r['floor_tokens_per_s']:.0f} | "
                   f"{r['heal']['tokens_per_s'] / r['floor_tokens_per_s']:.2f} | {r['heal']['seconds']:.0f} |")
    out.append("\n" + commands_of(rows))
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2", choices=sorted(MODELS))
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--compensation", default="lsq")
    ap.add_argument("--nsamples", type=int, default=128, help="pruning calibration windows")
    ap.add_argument("--tokens", type=int, default=250_000)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--method", default="full", choices=["full", "lora"])
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--eval-limit", type=int, default=48)
    ap.add_argument("--eval-batch", type=int, default=16)
    ap.add_argument("--zs-limit", type=int, default=20, help="zero-shot examples per task (0 = skip)")
    ap.add_argument("--results", default="benchmarks/results/heal.jsonl")
    ap.add_argument("--render", action="store_true")
    args = ap.parse_args()
    if args.render:
        print(render(Path(args.results)))
        return
    teacher, tok, _ = load(args.model)
    teacher = teacher.to(args.device)
    calib = calibration_windows("builtin:wiki", tok, args.nsamples, args.seqlen, 0)
    student = copy.deepcopy(teacher)
    prune_cfg = flap_llm.PruneConfig(ratio=args.ratio, compensation=args.compensation)
    flap_llm.prune(student, calib, prune_cfg, batch_size=args.batch_size)
    before = _quality(student, tok, args)
    print(f"{args.model} FLAP {args.ratio:.0%} {args.compensation}: wiki {before['ppl_wiki']:.2f}, books "
          f"{before['ppl_books']:.2f}", flush=True)
    # training windows: the calibration split of builtin:wiki (seed 1: not the pruning windows' draw)
    data = calibration_windows("builtin:wiki", tok, -(-args.tokens // args.seqlen), args.seqlen, 1)
    floor = _floor_tokens_per_s(student, data, args.batch_size, args.device)
    result = heal(student, teacher, data, HealConfig(tokens=args.tokens, lr=args.lr, method=args.method,
                                                     batch_size=args.batch_size), progress=True)
    after = _quality(student, tok, args)
    row = {"model": args.model, "prune": f"FLAP {args.ratio:.0%} + {args.compensation}", "before": before,
           "after": after, "heal": result.to_dict(), "floor_tokens_per_s": floor, "device": args.device,
           "versions": versions(), "command": command_line()}
    append_jsonl(Path(args.results), row)
    print(f"healed {result.tokens} tokens in {result.seconds:.0f}s ({result.tokens_per_s:.0f} tok/s, floor "
          f"{floor:.0f}): wiki {before['ppl_wiki']:.2f} -> {after['ppl_wiki']:.2f}, books {before['ppl_books']:.2f} "
          f"-> {after['ppl_books']:.2f}", flush=True)


if __name__ == "__main__":
    main()
