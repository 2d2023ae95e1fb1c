"""The flap-llm command line: `flap-llm prune` and `flap-llm eval`. It parses arguments and calls the
library; bad input exits with code 2 and one line (the traceback only with --debug)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

from .config import ALLOCATIONS, COMPENSATIONS, LSQ_DAMP, METHODS, MODES, OBS_DAMP, FlapOptions, ObsOptions, PruneConfig
from .errors import FlapError
from .metrics import FLUCTUATION_METRICS
from .select import STRUCTURES
from .export import GGUF_DTYPES, QUANT_TYPES, gguf_alignment
from .export.gguf_file import usable_type


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
    p.add_argument("--method", default="flap", choices=list(METHODS),
                   help="flap (the paper, default); obs (structured OBS: best measured on SmolLM2 and Qwen, not "
                        "offered for Gemma 3); the paper's baselines wanda-sp, mag-sp")
    f = p.add_argument_group("options of --method flap")
    f.add_argument("--metric", default=None, choices=list(FLUCTUATION_METRICS), help="fluctuation metric (default WIFV)")
    f.add_argument("--structure", default=None, choices=list(STRUCTURES),
                   help="how units are allotted to layers and modules (default AL-AM, adaptive)")
    f.add_argument("--remove-heads", type=int, default=None, help="KV groups to remove in total (UL-MM, AL-MM)")
    f.add_argument("--compensation", default=None, choices=list(COMPENSATIONS),
                   help="bias (the paper's, default), lsq (least-squares refit of the kept columns) or none")
    f.add_argument("--sequential", action="store_true", default=None,
                   help="with --compensation lsq: the refit's statistics from the already-pruned layers")
    o = p.add_argument_group("options of --method obs")
    o.add_argument("--allocation", default=None, choices=list(ALLOCATIONS),
                   help="per-module widths by refit errors on held-out halves of the windows (held-out, default) "
                        "or on the windows fitted (measured: faster, a little worse)")
    r = p.add_argument_group("options of the least-squares refit (--compensation lsq, --method obs)")
    r.add_argument("--lsq-damp", type=float, default=None,
                   help="the refit's ridge, as a fraction of the mean input variance "
                        f"(default {LSQ_DAMP} for lsq, {OBS_DAMP} for obs; larger: less fitted to the calibration)")
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
    p.add_argument("--export", default="flap", choices=["flap", "hf-uniform"],
                   help="checkpoint format: flap (any plan) or hf-uniform (stock transformers, uniform plans)")
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


class _Terminated(BaseException):
    """SIGTERM as an exception, so that temporary output is removed on the way out (as for Ctrl-C)."""


def _on_sigterm(signum, frame):
    raise _Terminated


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if threading.current_thread() is threading.main_thread() \
        else None
    show = warnings.showwarning
    warnings.showwarning = _show_warning  # the library's warnings as one line each
    try:
        return _run(args)
    except KeyboardInterrupt:
        print("flap-llm: interrupted; temporary output removed, nothing was changed", file=sys.stderr)
        return 130
    except _Terminated:
        print("flap-llm: terminated; temporary output removed, nothing was changed", file=sys.stderr)
        return 143
    finally:
        warnings.showwarning = show
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"flap-llm: warning: {message}", file=file or sys.stderr)


def _run(args) -> int:
    try:
        if args.quiet:
            os.environ.setdefault("TQDM_DISABLE", "1")
            from transformers.utils import logging as hf_logging
            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()
        if args.command == "prune":
            return _prune(args)
        if args.command == "export":
            return _export(args)
        if args.command == "heal":
            return _heal(args)
        return _eval(args)
    except FlapError as e:
        if args.debug:
            raise
        message = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        print(f"flap-llm: error: {message}", file=sys.stderr)
        return e.exit_code


def _say(args, msg: str) -> None:
    if not args.quiet:
        print(msg, flush=True)


FLAP_FLAGS = {"metric": "--metric", "structure": "--structure", "remove_heads": "--remove-heads",
              "compensation": "--compensation", "sequential": "--sequential"}
OBS_FLAGS = {"allocation": "--allocation"}


def _options(args) -> FlapOptions | ObsOptions | None:
    """The method's options from its flags; a flag of another method is refused with the method it belongs to."""
    flap = {k: getattr(args, k) for k in FLAP_FLAGS if getattr(args, k) is not None}
    obs = {k: getattr(args, k) for k in OBS_FLAGS if getattr(args, k) is not None}
    for mine, flags, owner in ((flap, FLAP_FLAGS, "flap"), (obs, OBS_FLAGS, "obs")):
        if mine and args.method != owner:
            raise FlapError(f"{', '.join(flags[k] for k in mine)}: option of --method {owner}, not {args.method}")
    if args.lsq_damp is not None and not (args.method == "obs" or flap.get("compensation") == "lsq"):
        raise FlapError("--lsq-damp is the ridge of the least-squares refit: use it with --compensation lsq or "
                        "--method obs")
    if args.method == "flap":
        return FlapOptions(**flap, lsq_damp=args.lsq_damp)
    if args.method == "obs":
        return ObsOptions(**obs, **({} if args.lsq_damp is None else {"lsq_damp": args.lsq_damp}))
    return None


def _validate_prune_args(args) -> tuple[PruneConfig, Path]:
    for name in ("nsamples", "seqlen", "batch_size"):
        if getattr(args, name) < 1:
            raise FlapError(f"--{name.replace('_', '-')} must be at least 1")
    _check_eval_args(args)
    options = _options(args)
    if args.export == "hf-uniform" and args.method == "obs":
        raise FlapError("--export hf-uniform needs every layer to keep the same shapes, which obs's allocation by "
                        "measured errors does not give; use --method flap --structure UL-UM, or --export flap")
    if args.export == "hf-uniform" and (options is None or options.structure not in ("UL-UM", "UL-MM")):
        raise FlapError("--export hf-uniform needs every layer to keep the same shapes; use --method flap --structure "
                        "UL-UM (or UL-MM), or --export flap")
    config = PruneConfig(ratio=args.ratio, method=args.method, options=options, mode=args.mode, align=args.align)
    from .checkpoint import check_destination
    out = Path(args.out).expanduser()
    sources = [args.model] if args.model and Path(args.model).expanduser().exists() else []
    check_destination(out, args.overwrite, sources)
    return config, out


def _check_eval_args(args) -> None:
    if args.eval_seqlen < 2:
        raise FlapError("--eval-seqlen must be at least 2 (one token predicts the next)")
    if args.eval_limit is not None and args.eval_limit < 1:
        raise FlapError("--eval-limit must be at least 1 (or leave it out to evaluate every window)")
    if args.batch_size < 1:
        raise FlapError("--batch-size must be at least 1")


def _check_report_file(name: str | None, flag: str) -> None:
    """An output file named on the command line must be writable before the evaluation starts."""
    if name is None:
        return
    from .checkpoint import check_writable_parent
    path = Path(name).expanduser()
    if path.is_dir():
        raise FlapError(f"{flag} {path} is a folder; give a file name")
    if not path.resolve().parent.is_dir():
        raise FlapError(f"{flag} {path}: the folder {path.resolve().parent} does not exist")
    check_writable_parent(path)


def _prune(args) -> int:
    from . import distributed, prune, save_pruned
    from .checkpoint import check_destination
    from .data import calibration_windows
    from .devices import pick_device
    from .models import load_model, load_tokenizer, resolve_model

    config, out = _validate_prune_args(args)
    if args.heal_tokens is not None and (args.heal_tokens < 1 or args.offload or config.mode == "mask"):
        raise FlapError("--heal-tokens needs a positive number of tokens, the model in memory and mode prune; "
                        "drop --offload/--mode mask, or heal the checkpoint afterwards with `flap-llm heal`")
    if args.gguf and (args.offload or config.mode == "mask"):
        raise FlapError("--gguf needs the pruned model in memory and mode prune; drop --offload/--mode mask and "
                        "export the checkpoint afterwards with `flap-llm export`")
    if args.gguf:
        args.gguf = usable_type(args.gguf)  # before any work
    if args.dry_run:
        from .estimate import config_of, prune_estimate
        device = _planned_device(args)
        from .devices import parse_dtype
        est = prune_estimate(config_of(args.model), config, nsamples=args.nsamples, seqlen=args.seqlen,
                             batch_size=args.batch_size, dtype=parse_dtype(args.dtype), device=device,
                             offload=args.offload)
        return _print_estimate(args, est, f"prune {args.model or 'builtin:smollm2'} ({config.label}, ratio "
                                          f"{config.ratio}{', --offload' if args.offload else ''}) on {device}")
    if args.json:
        raise FlapError("--json goes with --dry-run (the run itself writes report.json into --out)")
    tasks = _tasks(args)
    device = pick_device(args.device)
    if distributed.init_from_env(device) and device == "cuda":  # under torchrun: one GPU per rank
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    lead = distributed.rank() == 0  # only rank 0 evaluates and writes
    if not lead:
        args.quiet, args.no_eval, tasks = True, True, None
    if args.offload:
        if args.export != "flap" or distributed.active():
            raise FlapError("--offload writes format flap in a single process; drop --export/torchrun")
        if not args.no_eval or tasks:
            _say(args, "--offload: the model is never whole in memory, so no evaluation runs; evaluate the "
                       "result with `flap-llm eval` if it fits")
        args.no_eval, tasks = True, None
    progress = not args.quiet
    t0 = time.perf_counter()
    if args.offload:
        path, pruned = resolve_model(args.model, progress)
        if pruned or not Path(path).is_dir():
            raise FlapError(f"--offload needs a dense local model folder (or .gguf file); got {path}")
        check_destination(out, args.overwrite, [path])
        tokenizer, model = load_tokenizer(path), None
    else:
        model, tokenizer, path = load_model(args.model, args.dtype, device, progress, prunable=True)
        check_destination(out, args.overwrite, [path, getattr(model.config, "flap_source", None)])
        if getattr(model.config, "flap_layers", None):
            raise FlapError(f"{path} is already pruned; prune the original dense model instead")
        from .engine import check_model
        if args.gguf and config.align is None:  # ffn_down's rows take the type whole
            multiple = gguf_alignment(args.gguf)
            if multiple and multiple < model.config.intermediate_size:
                config = dataclasses.replace(config, align=multiple)
                _say(args, f"aligning each layer's kept MLP channels to a multiple of {multiple} for {args.gguf} "
                           "(--align sets another)")
        check_model(model, config)
        if args.gguf:  # refuse an architecture GGUF cannot express before the pruning run, not after
            from .export.gguf_file import check_exportable
            check_exportable(model, args.gguf)
    load_s = time.perf_counter() - t0
    calib = calibration_windows(args.calib, tokenizer, args.nsamples, args.seqlen, args.seed) \
        if config.needs_data else None
    max_pos = None if model is None else getattr(model.config, "max_position_embeddings", None)
    if max_pos and max(args.seqlen, args.eval_seqlen) > max_pos:
        print(f"flap-llm: warning: windows of {max(args.seqlen, args.eval_seqlen)} tokens are longer than the "
              f"model's {max_pos} positions; its outputs there are not meaningful", file=sys.stderr)
    ppl_before = None if args.no_eval else _ppl(args, model, tokenizer, args.eval_spec, progress)
    zs_before = _zeroshot(args, model, tokenizer, tasks)
    _say(args, f"pruning {path} ({config.label}, ratio {config.ratio})")
    from .data import bos_id
    calib_spec = {"source": args.calib, "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": args.seed,
                  "bos_first": tokenizer is not None and bos_id(tokenizer) is not None}
    extra = {"seed": args.seed, "calibration": calib_spec}
    context = {"model": path, "device": device, "dtype": args.dtype, "seed": args.seed, "calibration": calib_spec,
               "load_s": load_s, "title": f"{Path(path).name}: {config.label} {config.ratio:.0%}"}
    if args.offload:
        from .devices import parse_dtype
        from .offload import prune_offloaded
        reports: dict = {}

        def before_commit(folder: Path, result) -> None:
            reports["report"] = _report(context, result, None, None)
            _write_reports(folder, reports["report"], result)
            from .modelcard import model_card
            (folder / "README.md").write_text(model_card(reports["report"].to_dict(), out.name, "flap"))

        prune_offloaded(path, calib, config, out, tokenizer=tokenizer, device=device, dtype=parse_dtype(args.dtype),
                        batch_size=args.batch_size, progress=progress, overwrite=args.overwrite, extra=extra,
                        before_commit=before_commit)
        report = reports["report"]
    else:
        teacher = None
        if args.heal_tokens:  # the dense model teaches the pruned one (in bf16 on a GPU: distill.teacher_dtype)
            from .distill import teacher_copy, teacher_dtype
            teacher = teacher_copy(model, teacher_dtype(device, next(model.parameters()).dtype))
        result = prune(model, calib, config, batch_size=args.batch_size, progress=progress)
        if teacher is not None:
            extra["heal"] = _heal_after_prune(args, model, teacher, tokenizer, progress)
            del teacher
        ppl_after = None if args.no_eval else _ppl(args, model, tokenizer, args.eval_spec, progress)
        if "heal" in extra:
            _warn_if_healing_hurt(extra["heal"]["ppl_before_heal"], ppl_after, args.eval_spec)
        zs_after = _zeroshot(args, model, tokenizer, tasks)
        evaluation = None if args.no_eval else {"spec": args.eval_spec, "seqlen": args.eval_seqlen,
                                                "limit": args.eval_limit, "ppl_before": ppl_before,
                                                "ppl_after": ppl_after}
        zeroshot = None if tasks is None else {"before": zs_before, "after": zs_after}
        report = _report(context, result, evaluation, zeroshot)
        if "heal" in extra:
            report = report.with_evaluation(heal=extra["heal"])
        extra["metrics"] = {"perplexity": evaluation, "zeroshot": zeroshot}
        if not lead:
            return 0
        def before_commit(folder: Path) -> None:
            nonlocal report
            if args.gguf:
                from .export import save_gguf
                gguf_path = save_gguf(model, folder / f"model-{args.gguf}.gguf", tokenizer, args.gguf,
                                      progress=progress)
                report = report.with_evaluation(gguf=_gguf_report(args, gguf_path))
            _write_reports(folder, report, result)
            from .modelcard import model_card
            (folder / "README.md").write_text(model_card(report.to_dict(), out.name, args.export))

        save_pruned(model, out, tokenizer=tokenizer, result=result, format=args.export, overwrite=args.overwrite,
                    extra=extra, before_commit=before_commit)
    _say(args, report.summary())
    _say(args, f"saved the pruned model and reports to {out}")
    return 0


def _planned_device(args) -> str:
    """The device a dry run plans for: --device as given (a GPU this machine lacks too), or auto's pick here."""
    from .devices import pick_device
    return pick_device("auto") if args.device == "auto" else args.device


def _print_estimate(args, est, what: str) -> int:
    if args.json:
        print(json.dumps({"run": what, **est.to_dict()}, indent=2))
    else:
        print(f"dry run: {what}\n{est.summary()}")
    return 0


def _gguf_report(args, path: Path) -> dict:
    """The deployed file's type and size, and llama.cpp's own perplexity of it on the evaluation text (its
    convention: windows of --eval-seqlen tokens, the second half of each scored); None without llama.cpp's
    tools or with --no-eval."""
    out = {"file": path.name, "type": args.gguf, "bytes": path.stat().st_size, "llama_perplexity": None}
    from .llamacpp import bin_dir
    if args.no_eval or bin_dir() is None:
        out["llama_perplexity_skipped"] = "--no-eval" if args.no_eval else "llama.cpp's tools are not installed"
        return out
    import tempfile
    from .data import load_texts
    from .llamacpp import perplexity
    _say(args, f"measuring {path.name} with llama.cpp's llama-perplexity on {args.eval_spec}")
    with tempfile.TemporaryDirectory() as d:
        text = Path(d) / "eval.txt"
        text.write_text("\n\n".join(load_texts(args.eval_spec, "eval")))
        chunks = args.eval_limit if args.eval_limit else -1
        out["llama_perplexity"] = perplexity(path, text, args.eval_seqlen, chunks)
    out.update(llama_perplexity_spec=args.eval_spec, llama_perplexity_ctx=args.eval_seqlen)
    return out


def _heal_windows(args, tokenizer, spec: str, tokens: int, seqlen: int):
    """Training windows of the texts' calibration splits (the evaluation splits are never trained on)."""
    from .data import training_windows
    return training_windows(spec, tokenizer, -(-tokens // seqlen), seqlen, args.seed)


def _heal_after_prune(args, model, teacher, tokenizer, progress: bool) -> dict:
    from .distill import HealConfig, heal
    cfg = HealConfig(tokens=args.heal_tokens, batch_size=args.batch_size, seed=args.seed)
    data = _heal_windows(args, tokenizer, args.calib, args.heal_tokens, args.seqlen)
    ppl_pruned = None if args.no_eval else _ppl(args, model, tokenizer, args.eval_spec, progress)
    _say(args, f"healing: distilling the dense model into the pruned one on {args.heal_tokens} tokens of {args.calib}")
    result = heal(model, teacher, data, cfg, progress=progress)
    return {**result.to_dict(), "data": {"train": f"{args.calib} (calibration split)", "windows": list(data.shape)},
            "ppl_before_heal": ppl_pruned}


def _warn_if_healing_hurt(before: float | None, after: float | None, spec: str) -> None:
    """A short heal of a model already close to dense can raise its held-out perplexity (measured: Qwen2.5-Coder-
    0.5B, obs at 20%, 32k tokens); the user should know before deploying it."""
    if before is not None and after is not None and after > before:
        print(f"flap-llm: warning: healing raised the held-out perplexity on {spec} from {before:.2f} to {after:.2f}; "
              "the model before healing measured better (heal on more tokens, or prune without healing)",
              file=sys.stderr)


def _heal(args) -> int:
    from . import distributed, load_pruned, save_pruned
    from .checkpoint import check_destination, read_manifest, write_json
    from .distill import SHARDED_STATE, STATE_FILE, HealConfig, heal, teacher_dtype
    from .devices import pick_device
    from .models import load_model, load_tokenizer

    for name in ("tokens", "seqlen", "batch_size", "grad_accum"):
        if getattr(args, name) < 1:
            raise FlapError(f"--{name.replace('_', '-')} must be at least 1")
    if args.seqlen < 2:
        raise FlapError("--seqlen must be at least 2")
    _check_eval_args(args)
    tasks = _tasks(args)
    cfg = HealConfig(tokens=args.tokens, lr=args.lr, method=args.method, temperature=args.temperature,
                     kd_weight=args.kd_weight, batch_size=args.batch_size, grad_accum=args.grad_accum,
                     seed=args.seed, checkpoint_every=args.checkpoint_every, shard=args.shard)
    if args.shard and not args.dry_run and int(os.environ.get("WORLD_SIZE", "1")) < 2:
        raise FlapError("--shard shards the student over the processes of torch.distributed; run it under torchrun "
                        "with 2 or more processes (torchrun --nproc-per-node N -m flap_llm heal --shard ...), or drop "
                        "--shard")
    source = Path(args.model).expanduser()
    if not source.is_dir():
        raise FlapError(f"--model {source} is not a folder; give a pruned checkpoint (the --out of flap-llm prune)")
    manifest = read_manifest(source)
    teacher_name = args.teacher or manifest.get("base_model", {}).get("name_or_path")
    if not teacher_name:
        raise FlapError(f"{source}'s manifest names no base model; give the dense model with --teacher")
    if args.dry_run:
        from .estimate import config_of, heal_estimate
        from .devices import parse_dtype
        device = _planned_device(args)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        est = heal_estimate(config_of(str(source)), config_of(teacher_name), batch_size=args.batch_size,
                            seqlen=args.seqlen, method=args.method, world=world, shard=args.shard,
                            dtype=parse_dtype(args.dtype), device=device)
        est.work.update(tokens=args.tokens, steps=-(-args.tokens // (args.batch_size * args.grad_accum * args.seqlen)))
        return _print_estimate(args, est, f"heal {source} from {teacher_name} ({args.method}, {world} process"
                                          f"{'es' if world > 1 else ''}{', sharded' if args.shard else ''}) on {device}")
    if args.json:
        raise FlapError("--json goes with --dry-run (the run itself writes heal_report.json into --out)")
    out = Path(args.out).expanduser()
    check_destination(out, args.overwrite, [source, teacher_name])
    state_dir = out.parent / f".{out.name}.heal-state"
    if args.resume and not (state_dir / (SHARDED_STATE if args.shard else STATE_FILE)).exists():
        raise FlapError(f"nothing to resume: no {'sharded ' if args.shard else ''}resume checkpoint in {state_dir} "
                        "(run with --checkpoint-every N first, with the same --shard)")
    device = pick_device(args.device)
    if distributed.init_from_env(device) and device == "cuda":  # under torchrun: one GPU per rank
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    lead = distributed.rank() == 0  # only rank 0 evaluates and writes
    if not lead:
        args.quiet, args.no_eval, tasks = True, True, None
    progress = not args.quiet
    student = load_pruned(source, device=device)
    tokenizer = load_tokenizer(str(source))
    teacher, _, teacher_path = load_model(teacher_name, teacher_dtype(device, args.dtype), device, progress)
    from .distill import check_pair
    check_pair(student, teacher)
    data = _heal_windows(args, tokenizer, args.data, args.tokens, args.seqlen)
    ppl_before = None if args.no_eval else _ppl(args, student, tokenizer, args.eval_spec, progress)
    zs_before = _zeroshot(args, student, tokenizer, tasks)
    _say(args, f"healing {source} from {teacher_path} on {data.shape[0]} windows x {args.seqlen} tokens of {args.data}")
    result = heal(student, teacher, data, cfg, progress=progress,
                  checkpoint_dir=state_dir if (args.checkpoint_every or args.resume) else None, resume=args.resume)
    del teacher
    if not lead:
        return 0
    ppl_after = None if args.no_eval else _ppl(args, student, tokenizer, args.eval_spec, progress)
    zs_after = _zeroshot(args, student, tokenizer, tasks)
    report = {**result.to_dict(), "world_size": distributed.world_size(), "zeroshot": None if tasks is None else {"before": zs_before, "after": zs_after}, "model": str(source), "teacher": str(teacher_path),
              "data": {"train": f"{args.data} (calibration split)", "windows": list(data.shape),
                       "eval": None if args.no_eval else f"{args.eval_spec} (held-out split)"},
              "perplexity": None if args.no_eval else {"spec": args.eval_spec, "seqlen": args.eval_seqlen,
                                                       "limit": args.eval_limit, "before": ppl_before,
                                                       "after": ppl_after}}
    keep = {k: manifest[k] for k in ("prune_config", "plan", "report", "seed", "calibration", "metrics") if k in manifest}
    def before_commit(folder: Path) -> None:
        write_json(folder / "heal_report.json", report)
        if "report" in manifest:  # pruned by the CLI: the card gives the prune's numbers and the healing's
            from .modelcard import model_card
            metrics = manifest.get("metrics") or {}
            card = {**manifest["report"], "model": manifest.get("base_model", {}).get("name_or_path"),
                    "calibration": {**(manifest["report"].get("calibration") or {}), **(manifest.get("calibration") or {})},
                    "perplexity": metrics.get("perplexity"), "zeroshot": metrics.get("zeroshot"), "heal": report}
            (folder / "README.md").write_text(model_card(card, out.name, manifest.get("format", "flap")))
    save_pruned(student, out, tokenizer=tokenizer, overwrite=args.overwrite, extra={**keep, "heal": report},
                before_commit=before_commit)
    if state_dir.exists():
        import shutil
        shutil.rmtree(state_dir, ignore_errors=True)
    if ppl_before is not None:
        _say(args, f"perplexity ({args.eval_spec}): {ppl_before:.2f} before, {ppl_after:.2f} after healing")
    _warn_if_healing_hurt(ppl_before, ppl_after, args.eval_spec)
    _say(args, f"healed {result.tokens} tokens in {result.seconds:.0f} s ({result.tokens_per_s:.0f} tokens/s); "
               f"saved to {out}")
    return 0


def _export(args) -> int:
    from .export import save_gguf
    from .models import load_model
    from .export.gguf_file import check_gguf_destination
    out = Path(args.out).expanduser()
    if args.model and Path(args.model).expanduser().resolve() == out.resolve():
        raise FlapError(f"refusing to overwrite the source model {out}; choose another output name")
    check_gguf_destination(out, args.overwrite)  # before loading; save_gguf checks again, cheaply
    args.dtype = usable_type(args.dtype)  # before loading
    model, tokenizer, path = load_model(args.model, "float32", "cpu", not args.quiet)
    save_gguf(model, out, tokenizer, args.dtype, overwrite=args.overwrite, progress=not args.quiet)
    if not args.quiet:
        print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {args.dtype}) from {path}")
    return 0


def _report(context: dict, result, evaluation: dict | None, zeroshot: dict | None):
    fields = {k: v for k, v in context.items() if k != "load_s"}
    fields["calibration"] = {**(result.report.calibration or {}), **context["calibration"]}  # source and windows
    return result.report.with_evaluation(**fields, perplexity=evaluation, zeroshot=zeroshot, plan=result.plan.to_dict(),
                                         timings_s={"load": context["load_s"], **result.report.timings_s})


def _write_reports(folder: Path, report, result) -> None:
    from .checkpoint import write_json
    from .plot import plot_plan
    write_json(folder / "report.json", report.to_dict())
    (folder / "report.md").write_text(report.to_markdown())
    cfg = report["dense_shape"]
    plot_plan(result.plan.kept_counts(), cfg["num_attention_heads"], cfg["intermediate_size"], folder / "plan.png",
              report["title"])


def _ppl(args, model, tokenizer, spec: str, progress: bool) -> float:
    from .evaluate import perplexity
    return perplexity(model, tokenizer, spec, args.eval_seqlen, args.batch_size, args.eval_limit, progress)["ppl"]


def _tasks(args) -> list[str] | None:
    from .zeroshot import TASKS
    if not args.tasks:
        return None
    tasks = list(TASKS) if args.tasks == "all" else [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise FlapError(f"unknown task(s) {', '.join(unknown) or '(none given)'}; choose from: {', '.join(TASKS)} or all")
    if args.limit is not None and args.limit < 1:
        raise FlapError("--limit must be at least 1")
    return tasks


def _zeroshot(args, model, tokenizer, tasks: list[str] | None) -> dict | None:
    from .zeroshot import evaluate_zeroshot
    if not tasks:
        return None
    return evaluate_zeroshot(model, tokenizer, tasks, args.limit, args.batch_size, not args.quiet)


def _eval(args) -> int:
    from .checkpoint import write_text_atomic
    from .evaluate import perplexity
    from .devices import pick_device
    from .models import load_model
    from .report import versions, zeroshot_markdown

    _check_eval_args(args)
    _check_report_file(args.json, "--json")
    _check_report_file(args.md, "--md")
    tasks = _tasks(args)
    if args.no_ppl and not tasks:
        raise FlapError("nothing to evaluate: give --tasks or drop --no-ppl")
    device = pick_device(args.device)
    model, tokenizer, path = load_model(args.model, args.dtype, device, not args.quiet)
    res: dict = {"model": path, "versions": versions()}
    if not args.no_ppl:
        ppl = perplexity(model, tokenizer, args.ppl, args.eval_seqlen, args.batch_size, args.eval_limit, not args.quiet)
        res["perplexity"] = ppl
        print(f"perplexity {ppl['ppl']:.3f} on {ppl['spec']} ({ppl['windows']} windows of {ppl['seqlen']} tokens)")
    zs = _zeroshot(args, model, tokenizer, tasks)
    if zs is not None:
        res["zeroshot"] = zs
        print(zeroshot_markdown({"model": zs}))
    if args.json:
        write_text_atomic(Path(args.json).expanduser(), json.dumps(res, indent=2, default=str) + "\n")
    if args.md:
        write_text_atomic(Path(args.md).expanduser(), f"# flap-llm evaluation of `{path}`\n\n" + (
            f"Perplexity {res['perplexity']['ppl']:.3f} on {args.ppl}\n\n" if "perplexity" in res else "")
            + (zeroshot_markdown({"model": zs}) if zs else "") + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
