"""The command line's arguments: the parser of every command, and each registered method's options as flags
(built from its options class, so a new method needs no change here)."""

from __future__ import annotations

import argparse

from .config import MODES
from .errors import FlapError
from .export import GGUF_DTYPES, QUANT_TYPES
from .export.registry import FORMATS
from .methods import registry


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="float32", help="model dtype: float32 (default), bfloat16, float16, auto")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default 8)")
    p.add_argument("--eval-seqlen", type=int, default=128, help="perplexity window length (default 128, as the paper)")
    p.add_argument("--eval-limit", type=int, default=None, help="evaluate at most this many perplexity windows")
    p.add_argument("--tasks", default=None,
                   help="zero-shot tasks via lm-evaluation-harness, comma-separated: boolq,piqa,hellaswag,winogrande,"
                        "arc_easy,arc_challenge,openbookqa (or 'all')")
    p.add_argument("--limit", type=int, default=None, help="zero-shot: at most N examples per task")
    p.add_argument("--quiet", action="store_true", help="no progress bars or summary table")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def _method_arguments(p: argparse.ArgumentParser) -> None:
    """--method and every registered method's options, one group per method (a flag two methods share, such as
    --lsq-damp, sits in a group of its own); all default to None, so that a flag given can be told from one not."""
    methods = registry.all_methods()
    p.add_argument("--method", default=registry.DEFAULT, choices=[m.name for m in methods],
                   help="; ".join(f"{m.name}: {m.summary}" for m in methods))
    flags: dict[str, tuple[dict, list[str]]] = {}
    for m in methods:
        for f in m.options.flags() if m.options is not None else []:
            flags.setdefault(f["flag"], ({**f, "helps": []}, []))
            flags[f["flag"]][0]["helps"].append(f"{m.name}: {f['help']}" if f["help"] else m.name)
            flags[f["flag"]][1].append(m.name)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for flag, (f, owners) in flags.items():
        title = f"options of --method {', '.join(owners)}"
        group = groups.setdefault(title, p.add_argument_group(title))
        helptext = f["help"] if len(owners) == 1 else "; ".join(f["helps"])
        if "bool" in f["type"]:
            group.add_argument(flag, dest=f["name"], action="store_true", default=None, help=helptext)
        else:
            kind = int if f["type"].startswith("int") else float if f["type"].startswith("float") else str
            group.add_argument(flag, dest=f["name"], type=kind, default=None, choices=f["choices"], help=helptext)


def _method_flag_owners() -> dict[str, tuple[str, list[str]]]:
    """Each method option's dest -> (its flag, the methods that take it)."""
    owners: dict[str, tuple[str, list[str]]] = {}
    for m in registry.all_methods():
        for f in m.options.flags() if m.options is not None else []:
            owners.setdefault(f["name"], (f["flag"], []))[1].append(m.name)
    return owners


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flap-llm", description="Structured pruning of LLMs with FLAP, no retraining.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prune", help="prune a model (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--model", default=None, help="local HF folder, .gguf file, or hub id (default: builtin:smollm2)")
    p.add_argument("--calib", default="builtin:wiki",
                   help="builtin:wiki (default), builtin:books, a .txt file, a .jsonl file with a text field, hf:wikitext2")
    p.add_argument("--nsamples", type=int, default=1024, help="calibration windows (default 1024, as the paper)")
    p.add_argument("--seqlen", type=int, default=128, help="calibration window length in tokens (default 128)")
    p.add_argument("--seed", type=int, default=0, help="seed for sampling calibration windows (default 0)")
    p.add_argument("--ratio", type=float, default=0.2, help="fraction of attention+MLP parameters to remove (default 0.2)")
    _method_arguments(p)
    p.add_argument("--mode", default="prune", choices=MODES)
    p.add_argument("--align", type=int, default=None,
                   help="round each layer's kept MLP channels to a multiple of N, by score (64/128 suit GPUs)")
    p.add_argument("--eval", dest="eval_spec", default="builtin:wiki", help="perplexity text (default builtin:wiki, held-out articles)")
    p.add_argument("--no-eval", action="store_true", help="skip the perplexity before and after")
    p.add_argument("--out", default="./flap-out", help="output folder (default ./flap-out)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--dry-run", action="store_true",
                   help="read only the model's config, print the peak host and device memory and the work this run "
                        "needs (and what to change if it will not fit), and write nothing")
    p.add_argument("--json", action="store_true", help="with --dry-run: print the estimate as JSON")
    p.add_argument("--offload", action="store_true",
                   help="stream the model layer by layer from its safetensors files (models larger than memory)")
    p.add_argument("--export", default="flap", choices=list(FORMATS),
                   help="checkpoint format: " + "; ".join(f"{f.name}: {f.summary}" for f in FORMATS.values()))
    p.add_argument("--gguf", nargs="?", const="f16", default=None, metavar="TYPE",
                   help="also write model-TYPE.gguf for llama.cpp into --out, and report its size and llama.cpp's "
                        f"perplexity (TYPE: {', '.join(GGUF_DTYPES)} (f16 by default), or through llama-quantize "
                        f"{', '.join(QUANT_TYPES)}; any case); without --align the MLP widths are aligned for the "
                        "type (256 for k-quants, 32 for the others but f32/bf16)")
    p.add_argument("--heal-tokens", type=int, default=None, metavar="N",
                   help="after pruning, distill the dense model into the pruned one on N tokens of --calib's text "
                        "(see `flap-llm heal`)")
    _common(p)

    h = sub.add_parser("heal", help="distill the dense model into a pruned checkpoint to win back quality")
    h.add_argument("--model", required=True, help="the pruned checkpoint (the --out of flap-llm prune)")
    h.add_argument("--teacher", default=None,
                   help="the dense model it was pruned from (default: the base model its manifest names)")
    h.add_argument("--data", default="builtin:wiki",
                   help="training text: builtin:wiki (default; its calibration articles, never the held-out ones), "
                        "builtin:books, a .txt or .jsonl file, or several, comma-separated (an equal share of each)")
    h.add_argument("--tokens", type=int, default=250_000, help="training tokens (default 250000)")
    h.add_argument("--seqlen", type=int, default=128, help="training window length (default 128)")
    h.add_argument("--method", default="full", choices=["full", "lora"], help="full fine-tuning (default) or LoRA")
    h.add_argument("--lr", type=float, default=None, help="peak learning rate (default 5e-5 full, 1e-3 LoRA)")
    h.add_argument("--temperature", type=float, default=1.0, help="distillation temperature (default 1)")
    h.add_argument("--kd-weight", type=float, default=1.0,
                   help="weight of the KL to the teacher; the rest goes to the LM loss (default 1)")
    h.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    h.add_argument("--seed", type=int, default=0, help="seed for the training windows and their order (default 0)")
    h.add_argument("--checkpoint-every", type=int, default=0,
                   help="write a resume checkpoint every N steps beside --out (default 0: none)")
    h.add_argument("--resume", action="store_true", help="continue an interrupted run from its resume checkpoint")
    h.add_argument("--dry-run", action="store_true",
                   help="read only the configs, print the peak memory per process and the work, and write nothing")
    h.add_argument("--json", action="store_true", help="with --dry-run: print the estimate as JSON")
    h.add_argument("--shard", action="store_true",
                   help="under torchrun: shard the student, its gradients and optimizer state over the processes "
                        "(FSDP2) instead of replicating them (DDP)")
    h.add_argument("--eval", dest="eval_spec", default="builtin:wiki",
                   help="perplexity text before and after (default builtin:wiki, held-out articles)")
    h.add_argument("--no-eval", action="store_true", help="skip the perplexity before and after")
    h.add_argument("--out", required=True, help="output folder for the healed checkpoint")
    h.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    _common(h)

    x = sub.add_parser("export", help="write a GGUF file for llama.cpp (pruned checkpoint, dense model or .gguf)")
    x.add_argument("--model", default=None, help="pruned checkpoint, local HF folder, .gguf file (default: builtin:smollm2)")
    x.add_argument("--out", required=True, help="the GGUF file to write (name ending in .gguf)")
    x.add_argument("--dtype", default="f16", help=f"weight type: {', '.join(GGUF_DTYPES)} (f16 by default), or "
                                                  f"through llama-quantize {', '.join(QUANT_TYPES)} (any case)")
    x.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    x.add_argument("--quiet", action="store_true", help="no progress bars")
    x.add_argument("--debug", action="store_true", help="show tracebacks")

    e = sub.add_parser("eval", help="perplexity of any model, dense or pruned")
    e.add_argument("--model", default=None, help="local HF folder, pruned checkpoint, .gguf file, or hub id")
    e.add_argument("--ppl", default="builtin:wiki", help="text for perplexity (default builtin:wiki)")
    e.add_argument("--no-ppl", action="store_true", help="skip perplexity (e.g. with --tasks only)")
    e.add_argument("--json", default=None, help="also write the result to this JSON file")
    e.add_argument("--md", default=None, help="also write the result as markdown to this file")
    _common(p=e)
    return parser


def method_options(args):
    """The method's options from its flags; a flag of another method is refused with the methods it belongs to."""
    method = registry.get(args.method)
    owners = _method_flag_owners()
    given = {name: getattr(args, name) for name in owners if getattr(args, name, None) is not None}
    mine = method.options.field_names() if method.options is not None else set()
    foreign: dict[str, list[str]] = {}
    for name in given:
        if name not in mine:
            flag, methods = owners[name]
            foreign.setdefault(", ".join(methods), []).append(flag)
    for methods, flags in foreign.items():
        raise FlapError(f"{', '.join(flags)}: option of --method {methods}, not {args.method}")
    return None if method.options is None else method.options(**given)
