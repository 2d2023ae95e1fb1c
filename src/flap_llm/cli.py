"""The flap-llm command line: prune, heal, export and eval. It parses arguments and calls the library (the
workflow functions in workflow.py); bad input exits with code 2 and one line (the traceback only with --debug),
a full disk with code 1."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import warnings

from .arguments import build_parser, method_options
from .config import PruneConfig
from .errors import FlapError


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
        return {"prune": _prune, "export": _export, "heal": _heal, "eval": _eval}[args.command](args)
    except FlapError as e:
        if args.debug:
            raise
        message = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        print(f"flap-llm: error: {message}", file=sys.stderr)
        return e.exit_code


def _log(args):
    return None if args.quiet else (lambda msg: print(msg, flush=True))


def _evaluation(args, perplexity: bool, text: str):
    from .workflow import Evaluation
    if args.batch_size < 1:
        raise FlapError("--batch-size must be at least 1")
    return Evaluation(perplexity=perplexity, text=text, seqlen=args.eval_seqlen, limit=args.eval_limit,
                      tasks=args.tasks, task_limit=args.limit)


def _prune(args) -> int:
    from .workflow import Calibration, check_prune, prune_model
    calibration = Calibration(args.calib, args.nsamples, args.seqlen, args.seed)
    evaluation = _evaluation(args, not args.no_eval, args.eval_spec)
    config = PruneConfig(ratio=args.ratio, method=args.method, options=method_options(args), mode=args.mode,
                         align=args.align)
    run = dict(export=args.export, heal_tokens=args.heal_tokens, gguf=args.gguf, offload=args.offload,
               batch_size=args.batch_size, overwrite=args.overwrite)
    check_prune(args.model, config, args.out, **run)
    if args.dry_run:
        from .model.devices import parse_dtype
        from .reporting.estimate import config_of, prune_estimate
        device = _planned_device(args)
        est = prune_estimate(config_of(args.model), config, nsamples=args.nsamples, seqlen=args.seqlen,
                             batch_size=args.batch_size, dtype=parse_dtype(args.dtype), device=device,
                             offload=args.offload)
        return _print_estimate(args, est, f"prune {args.model or 'builtin:smollm2'} ({config.label}, ratio "
                                          f"{config.ratio}{', --offload' if args.offload else ''}) on {device}")
    if args.json:
        raise FlapError("--json goes with --dry-run (the run itself writes report.json into --out)")
    prune_model(args.model, config, args.out, calibration=calibration, evaluation=evaluation, device=args.device,
                dtype=args.dtype, progress=not args.quiet, log=_log(args), **run)
    return 0


def _planned_device(args) -> str:
    """The device a dry run plans for: --device as given (a GPU this machine lacks too), or auto's pick here."""
    from .model.devices import pick_device
    return pick_device("auto") if args.device == "auto" else args.device


def _print_estimate(args, est, what: str) -> int:
    if args.json:
        print(json.dumps({"run": what, **est.to_dict()}, indent=2))
    else:
        print(f"dry run: {what}\n{est.summary()}")
    return 0


def _heal(args) -> int:
    from .healing.distill import HealConfig
    from .workflow import check_heal, heal_model
    evaluation = _evaluation(args, not args.no_eval, args.eval_spec)
    cfg = HealConfig(tokens=args.tokens, lr=args.lr, method=args.method, temperature=args.temperature,
                     kd_weight=args.kd_weight, batch_size=args.batch_size, grad_accum=args.grad_accum,
                     seed=args.seed, checkpoint_every=args.checkpoint_every, shard=args.shard)
    source, teacher, _ = check_heal(args.model, args.teacher, cfg, args.seqlen, planning=args.dry_run)
    if args.dry_run:
        from .model.devices import parse_dtype
        from .reporting.estimate import config_of, heal_estimate
        device, world = _planned_device(args), int(os.environ.get("WORLD_SIZE", "1"))
        est = heal_estimate(config_of(str(source)), config_of(teacher), batch_size=args.batch_size,
                            seqlen=args.seqlen, method=args.method, world=world, shard=args.shard,
                            dtype=parse_dtype(args.dtype), device=device)
        est.work.update(tokens=args.tokens, steps=-(-args.tokens // (args.batch_size * args.grad_accum * args.seqlen)))
        return _print_estimate(args, est, f"heal {source} from {teacher} ({args.method}, {world} process"
                                          f"{'es' if world > 1 else ''}{', sharded' if args.shard else ''}) on {device}")
    if args.json:
        raise FlapError("--json goes with --dry-run (the run itself writes heal_report.json into --out)")
    heal_model(source, args.out, teacher=args.teacher, data=args.data, config=cfg, seqlen=args.seqlen,
               evaluation=evaluation, device=args.device, dtype=args.dtype, overwrite=args.overwrite,
               resume=args.resume, progress=not args.quiet, log=_log(args))
    return 0


def _export(args) -> int:
    from .export import export_gguf, gguf_type
    path, out = export_gguf(args.model, args.out, args.dtype, overwrite=args.overwrite, progress=not args.quiet)
    if not args.quiet:
        print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {gguf_type(args.dtype)}) from {path}")
    return 0


def _eval(args) -> int:
    from .workflow import evaluate_model
    evaluation = _evaluation(args, not args.no_ppl, args.ppl)
    evaluate_model(args.model, evaluation, json_path=args.json, md_path=args.md, device=args.device, dtype=args.dtype,
                   batch_size=args.batch_size, progress=not args.quiet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
