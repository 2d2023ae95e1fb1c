"""The heal teacher held in bf16 (what `heal` and `prune --heal-tokens` do on a GPU) against fp32: how far the
rounding moves the teacher's next-token distribution, beside the distance healing has to close (the pruned
student's KL to the teacher), on held-out windows; and the perplexity of both teachers.

  .venv/bin/python benchmarks/studies/teacher_dtype.py --model smollm2 --ratio 0.5
  .venv/bin/python benchmarks/studies/teacher_dtype.py --render     (--write: into BENCHMARKS.md, between its markers)

On the CPU the bf16 teacher computes everything in bf16; on a GPU under autocast its products are bf16 with
either weights, so this bounds the GPU difference from above.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py
import flap_llm  # noqa: E402
from common import append_jsonl, command_line, commands_of, fill_between, load, read_jsonl  # noqa: E402
from flap_llm.calibration.data import bos_id, calibration_windows, load_texts, tokenize_corpus  # noqa: E402
from flap_llm.healing.distill import distill_loss, teacher_copy  # noqa: E402
from flap_llm.eval.evaluate import eval_windows, perplexity_of_windows  # noqa: E402
from flap_llm.reporting.report import versions  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "teacher_dtype.jsonl"


@torch.no_grad()
def mean_kl(p_model, q_model, windows: torch.Tensor, batch_size: int) -> float:
    """KL(p || q) of the next-token distributions, averaged over every position of every window."""
    total = 0.0
    for batch in windows.split(batch_size):
        _, kl = distill_loss(q_model(batch, use_cache=False).logits.float(),
                             p_model(batch, use_cache=False).logits.float(), batch, 1.0, 1.0)
        total += float(kl) * batch.shape[0]
    return total / windows.shape[0]


def render(path: Path = RESULTS) -> str:
    rows = read_jsonl(path)
    out = ["| model | ratio | KL(fp32 teacher ‖ bf16 teacher) | KL(teacher ‖ pruned student) | share | "
           "wiki ppl: fp32 teacher | bf16 teacher |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['model']} | {r['ratio']} | {r['kl_teacher_rounding']:.5f} | {r['kl_student']:.4f} | "
                   f"{r['kl_teacher_rounding'] / r['kl_student']:.2%} | {r['ppl_fp32']:.3f} | {r['ppl_bf16']:.3f} |")
    return "\n".join(out) + "\n\n" + commands_of(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--nsamples", type=int, default=64, help="calibration windows of the prune")
    ap.add_argument("--eval-limit", type=int, default=48, help="held-out wiki windows of 128 tokens")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--render", action="store_true")
    ap.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md and exit")
    args = ap.parse_args()
    if args.write:
        fill_between(Path(__file__).resolve().parent.parent / "BENCHMARKS.md", "teacher dtype table", render())
        return
    if args.render:
        print(render())
        return
    torch.manual_seed(0)
    teacher, tok, _ = load(args.model)
    half = teacher_copy(teacher, torch.bfloat16)
    windows = eval_windows(tokenize_corpus(load_texts("builtin:wiki", "eval"), tok), 128, bos_id(tok), args.eval_limit)
    student = copy.deepcopy(teacher)
    flap_llm.prune(student, calibration_windows("builtin:wiki", tok, args.nsamples, 128, 0),
                   flap_llm.PruneConfig(ratio=args.ratio, compensation="lsq"), batch_size=args.batch_size)
    row = {"model": args.model, "ratio": args.ratio, "windows": list(windows.shape),
           "kl_teacher_rounding": mean_kl(teacher, half, windows, args.batch_size),
           "kl_student": mean_kl(teacher, student, windows, args.batch_size),
           "kl_student_of_bf16_teacher": mean_kl(half, student, windows, args.batch_size),
           "ppl_fp32": perplexity_of_windows(teacher, windows, args.batch_size)["ppl"],
           "ppl_bf16": perplexity_of_windows(half, windows, args.batch_size)["ppl"],
           "versions": versions(), "command": command_line()}
    append_jsonl(RESULTS, row)
    print(render())


if __name__ == "__main__":
    main()
