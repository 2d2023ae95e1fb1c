"""Healing: prune (FLAP + lsq by default), then distill the dense model into the pruned one, and measure
held-out perplexity on two domains and zero-shot accuracy before and after, with healing tokens/s against the
floor (one forward+backward of the student on the same batches, timed in the same run).

  .venv/bin/python benchmarks/heal.py --model smollm2 --ratio 0.5 --tokens 250000
  .venv/bin/python benchmarks/heal.py --render

On a GPU (bf16 autocast and gradient checkpointing turn on by themselves on CUDA):
  .venv/bin/python benchmarks/heal.py --model qwen1.5b --device cuda --ratio 0.5 --tokens 2000000 --batch-size 16

Several heal settings from one pruned model (each "tokens:lr:kd_weight"; the student is pruned and measured once):
  .venv/bin/python benchmarks/heal.py --model qwen0.5b --device cuda --sweep 250000:5e-5:1 1000000:1e-4:0.5

Throughput alone, on a model of a real 1B-class shape with random weights and random tokens (no quality numbers:
the weights mean nothing, but a step's arithmetic and memory are those of the real model):
  .venv/bin/python benchmarks/heal.py --synthetic qwen2.5-1.5b --device cuda --tokens 262144 --seqlen 1024
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
from flap_llm.calibration.data import calibration_windows, training_windows  # noqa: E402
from flap_llm.eval.evaluate import perplexity  # noqa: E402
from flap_llm.healing.distill import HealConfig, distill_loss, heal, teacher_dtype  # noqa: E402
from flap_llm.reporting.report import versions  # noqa: E402
from flap_llm.eval.zeroshot import TASKS, evaluate_zeroshot  # noqa: E402

# Real 1B-class shapes (the models' published configs), for --synthetic throughput runs.
SHAPES = {
    "qwen2.5-1.5b": {"model_type": "qwen2", "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                     "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936,
                     "tie_word_embeddings": True, "rope_theta": 1000000.0, "max_position_embeddings": 32768},
    "llama3.2-1b": {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                    "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                    "tie_word_embeddings": True, "rope_theta": 500000.0, "max_position_embeddings": 131072},
}


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
    if cuda:  # as heal() runs it
        student.gradient_checkpointing_enable()
    tokens, seconds = 0, 0.0
    for i in range(batches + 1):  # the first batch warms up
        ids = data[(torch.arange(batch_size) + i * batch_size) % data.shape[0]].to(device)
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
    if cuda:
        student.gradient_checkpointing_disable()
    for p, f in zip(params, flags):
        p.requires_grad_(f)
    student.eval()
    return tokens / seconds


def render(results: Path) -> str:
    rows = read_jsonl(results)
    real = [r for r in rows if not r.get("synthetic")]
    out = ["| model | prune | heal tokens | method | lr | kd weight | wiki ppl before → after | books ppl before → after | "
           "zero-shot avg before → after | heal tok/s | floor tok/s | ratio | heal (s) | device |",
           "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in real:
        b, a, cfg = r["before"], r["after"], r["heal"]["config"]
        zs = (f"{100 * b['zeroshot_avg']:.1f} → {100 * a['zeroshot_avg']:.1f}"
              if b["zeroshot_avg"] is not None and a["zeroshot_avg"] is not None else "–")
        data = r.get("train_data", "builtin:wiki")
        method = cfg["method"] + ("" if data == "builtin:wiki" else f" on {data}")
        out.append(f"| {r['model']} | {r['prune']} | {r['heal']['tokens']:,} | {method} | "
                   f"{cfg['lr']:g} | {cfg['kd_weight']:g} | {b['ppl_wiki']:.2f} → {a['ppl_wiki']:.2f} "
                   f"({a['ppl_wiki'] / b['ppl_wiki']:.2f}x) | {b['ppl_books']:.2f} → {a['ppl_books']:.2f} | {zs} | "
                   f"{r['heal']['tokens_per_s']:.0f} | {r['floor_tokens_per_s']:.0f} | "
                   f"{r['heal']['tokens_per_s'] / r['floor_tokens_per_s']:.2f} | {r['heal']['seconds']:.0f} | "
                   f"{r.get('device_name') or r['device']} |")
    out.append("\n" + commands_of(real))
    synthetic = [r for r in rows if r.get("synthetic")]
    if synthetic:
        out += ["", "Random weights (throughput only):", "",
                "| shape | parameters dense → pruned | prune | window | batch | heal tokens | heal tok/s | floor tok/s | "
                "ratio | peak GiB | device |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in synthetic:
            out.append(f"| {r['model']} | {r['params_dense'] / 1e9:.2f}B → {r['params_pruned'] / 1e9:.2f}B | "
                       f"{r['prune']} | {r['seqlen']} | {r['heal']['config']['batch_size']} | {r['heal']['tokens']:,} | "
                       f"{r['heal']['tokens_per_s']:,.0f} | {r['floor_tokens_per_s']:,.0f} | "
                       f"{r['heal']['tokens_per_s'] / r['floor_tokens_per_s']:.2f} | {r.get('peak_gib', float('nan')):.1f} | "
                       f"{r.get('device_name') or r['device']} |")
        out.append("\n" + commands_of(synthetic))
    return "\n".join(out)


def _runs(args) -> list[tuple[int, float | None, float]]:
    """(tokens, lr, kd_weight) of each heal: --sweep's specs, or the single run of --tokens/--lr/--kd-weight."""
    if not args.sweep:
        return [(args.tokens, args.lr, args.kd_weight)]
    runs = []
    for spec in args.sweep:
        try:
            tokens, lr, kd = spec.split(":")
            runs.append((int(float(tokens)), float(lr), float(kd)))
        except ValueError:
            raise SystemExit(f"--sweep takes tokens:lr:kd_weight, e.g. 1000000:1e-4:0.5; got {spec!r}")
    return runs


def _reset_peak_memory(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(torch.device(device))


def _device_facts(device: str) -> dict:
    if torch.device(device).type != "cuda":
        return {}
    return {"device_name": torch.cuda.get_device_name(torch.device(device)),
            "peak_gib": torch.cuda.max_memory_allocated(torch.device(device)) / 2 ** 30}


def _synthetic(args, run: tuple[int, float | None, float]) -> None:
    """Prune and heal a randomly initialised model of a real shape on random tokens: tokens/s and memory only."""
    from transformers import AutoConfig, AutoModelForCausalLM
    shape = dict(SHAPES[args.synthetic])
    config = AutoConfig.for_model(shape.pop("model_type"), **shape)
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(args.device).eval()
    g = torch.Generator().manual_seed(0)
    calib = torch.randint(config.vocab_size, (args.nsamples, args.seqlen), generator=g)
    student = copy.deepcopy(teacher)
    teacher.to(teacher_dtype(args.device, torch.float32))  # as the command line holds it: bf16 on a GPU
    dense = sum(p.numel() for p in teacher.parameters())
    synchronize(args.device)
    t = time.perf_counter()
    flap_llm.prune(student, calib, flap_llm.PruneConfig(ratio=args.ratio, compensation=args.compensation),
                   batch_size=args.batch_size)
    synchronize(args.device)
    prune_s = time.perf_counter() - t
    pruned = sum(p.numel() for p in student.parameters())
    tokens, lr, kd = run
    data = torch.randint(config.vocab_size, (-(-tokens // args.seqlen), args.seqlen), generator=g)
    _reset_peak_memory(args.device)
    floor = _floor_tokens_per_s(student, data, args.batch_size, args.device)
    result = heal(student, teacher, data, HealConfig(tokens=tokens, lr=lr, kd_weight=kd, method=args.method,
                                                     batch_size=args.batch_size), progress=True)
    row = {"model": args.synthetic, "synthetic": True, "prune": f"FLAP {args.ratio:.0%} + {args.compensation}",
           "prune_seconds": prune_s, "params_dense": dense, "params_pruned": pruned, "seqlen": args.seqlen,
           "heal": result.to_dict(), "floor_tokens_per_s": floor, "device": args.device,
           **_device_facts(args.device), "versions": versions(), "command": command_line()}
    append_jsonl(Path(args.results), row)
    print(f"{args.synthetic} (random weights) {dense / 1e9:.2f}B -> {pruned / 1e9:.2f}B, pruned in {prune_s:.1f}s; "
          f"healed {result.tokens} tokens at {result.tokens_per_s:.0f} tok/s (floor {floor:.0f}), "
          f"peak {row.get('peak_gib', 0):.1f} GiB", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2", choices=sorted(MODELS))
    ap.add_argument("--synthetic", choices=sorted(SHAPES), help="random weights of this shape: throughput only")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--compensation", default="lsq")
    ap.add_argument("--nsamples", type=int, default=128, help="pruning calibration windows")
    ap.add_argument("--tokens", type=int, default=250_000)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--method", default="full", choices=["full", "lora"])
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--kd-weight", type=float, default=1.0, help="the KL's weight; the rest goes to the LM loss")
    ap.add_argument("--sweep", nargs="+", metavar="TOKENS:LR:KD", help="several heals of one pruned model")
    ap.add_argument("--train-data", default="builtin:wiki",
                    help="comma-separated texts to heal on, their calibration splits in equal shares of the windows "
                         "(the evaluation splits are never trained on)")
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
    runs = _runs(args)
    if args.synthetic:
        if len(runs) > 1:
            raise SystemExit("--synthetic measures one heal; give --tokens/--lr/--kd-weight, not --sweep")
        _synthetic(args, runs[0])
        return
    teacher, tok, _ = load(args.model)
    teacher = teacher.to(args.device)
    calib = calibration_windows("builtin:wiki", tok, args.nsamples, args.seqlen, 0)
    pruned = copy.deepcopy(teacher)
    teacher.to(teacher_dtype(args.device, torch.float32))  # as the command line holds it: bf16 on a GPU
    prune_cfg = flap_llm.PruneConfig(ratio=args.ratio, compensation=args.compensation)
    flap_llm.prune(pruned, calib, prune_cfg, batch_size=args.batch_size)
    before = _quality(pruned, tok, args)
    print(f"{args.model} FLAP {args.ratio:.0%} {args.compensation}: wiki {before['ppl_wiki']:.2f}, books "
          f"{before['ppl_books']:.2f}, zero-shot {before['zeroshot_avg']}", flush=True)
    # training windows: the calibration splits of --train-data (seed 1: not the pruning windows' draw)
    data = training_windows(args.train_data, tok, -(-max(r[0] for r in runs) // args.seqlen), args.seqlen, 1)
    for tokens, lr, kd in runs:
        student = copy.deepcopy(pruned) if len(runs) > 1 else pruned
        _reset_peak_memory(args.device)
        floor = _floor_tokens_per_s(student, data, args.batch_size, args.device)
        result = heal(student, teacher, data, HealConfig(tokens=tokens, lr=lr, kd_weight=kd, method=args.method,
                                                         batch_size=args.batch_size), progress=True)
        after = _quality(student, tok, args)
        row = {"model": args.model, "prune": f"FLAP {args.ratio:.0%} + {args.compensation}", "before": before,
               "train_data": args.train_data,
               "after": after, "heal": result.to_dict(), "floor_tokens_per_s": floor, "device": args.device,
               **_device_facts(args.device), "versions": versions(), "command": command_line()}
        append_jsonl(Path(args.results), row)
        print(f"healed {result.tokens} tokens (lr {result.config.learning_rate:g}, kd {kd:g}) in {result.seconds:.0f}s "
              f"({result.tokens_per_s:.0f} tok/s, floor {floor:.0f}): wiki {before['ppl_wiki']:.2f} -> "
              f"{after['ppl_wiki']:.2f}, books {before['ppl_books']:.2f} -> {after['ppl_books']:.2f}, zero-shot "
              f"{after['zeroshot_avg']}", flush=True)
        del student


if __name__ == "__main__":
    main()
