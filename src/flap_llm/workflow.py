"""The one-command paths as library calls: prune_model (load → prune → heal → evaluate → save → export → card)
and heal_model (load → heal → evaluate → save → card). The command line parses arguments and calls these; a
Python user gets the same checks up front (nothing runs before every input is validated), the same atomic
outputs and the same reports.

    from flap_llm.workflow import prune_model
    prune_model("path/to/model", PruneConfig(ratio=0.2), "out", heal_tokens=250_000, gguf="Q4_K_M")
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .config import PruneConfig
from .errors import FlapError
from .reporting.report import PruneReport

Log = Callable[[str], None] | None


@dataclass(frozen=True)
class Calibration:
    """The calibration windows: `nsamples` random windows of `seqlen` tokens of `text` (a built-in, a .txt or
    .jsonl file, or a hub text), drawn with `seed`. The paper's: 1,024 windows of 128 tokens."""

    text: str = "builtin:wiki"
    nsamples: int = 1024
    seqlen: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("nsamples", "seqlen"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise FlapError(f"--{name} must be at least 1")

    def to_dict(self, tokenizer=None) -> dict:
        from .calibration.data import bos_id
        return {"source": self.text, "nsamples": self.nsamples, "seqlen": self.seqlen, "seed": self.seed,
                "bos_first": tokenizer is not None and bos_id(tokenizer) is not None}


@dataclass(frozen=True)
class Evaluation:
    """What is measured before and after: perplexity on the held-out split of `text` (windows of `seqlen`, at
    most `limit` of them; `perplexity=False` skips it) and zero-shot accuracy on `tasks` (lm-evaluation-harness,
    at most `task_limit` examples each; "all" for the paper's seven)."""

    perplexity: bool = True
    text: str = "builtin:wiki"
    seqlen: int = 128
    limit: int | None = None
    tasks: tuple[str, ...] | str | None = None
    task_limit: int | None = None

    def __post_init__(self) -> None:
        if self.seqlen < 2:
            raise FlapError("--eval-seqlen must be at least 2 (one token predicts the next)")
        if self.limit is not None and self.limit < 1:
            raise FlapError("--eval-limit must be at least 1 (or leave it out to evaluate every window)")
        object.__setattr__(self, "tasks", _tasks(self.tasks))
        if self.tasks and self.task_limit is not None and self.task_limit < 1:
            raise FlapError("--limit must be at least 1")

    def ppl(self, model, tokenizer, batch_size: int, progress: bool) -> float | None:
        from .eval.evaluate import perplexity
        if not self.perplexity:
            return None
        return perplexity(model, tokenizer, self.text, self.seqlen, batch_size, self.limit, progress)["ppl"]

    def zeroshot(self, model, tokenizer, batch_size: int, progress: bool) -> dict | None:
        from .eval.zeroshot import evaluate_zeroshot
        if not self.tasks:
            return None
        return evaluate_zeroshot(model, tokenizer, list(self.tasks), self.task_limit, batch_size, progress)


def _tasks(tasks) -> tuple[str, ...] | None:
    from .eval.zeroshot import TASKS
    if not tasks:
        return None
    if isinstance(tasks, str):
        tasks = list(TASKS) if tasks == "all" else [t.strip() for t in tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise FlapError(f"unknown task(s) {', '.join(unknown) or '(none given)'}; choose from: {', '.join(TASKS)} or all")
    return tuple(tasks)


NO_EVALUATION = Evaluation(perplexity=False)


def _device(device: str) -> tuple[str, bool]:
    """The device to run on (under torchrun: this rank's GPU) and whether this process leads (rank 0 evaluates
    and writes)."""
    from .calibration import distributed
    from .model.devices import pick_device
    device = pick_device(device)
    if distributed.init_from_env(device) and device == "cuda":  # under torchrun: one GPU per rank
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return device, distributed.rank() == 0


def _say(log: Log, message: str) -> None:
    if log is not None:
        log(message)


def prune_model(model: str | None = None, config: PruneConfig | None = None, out: str | os.PathLike = "flap-out", *,
                calibration: Calibration = Calibration(), evaluation: Evaluation = Evaluation(),
                heal_tokens: int | None = None, export: str = "flap", gguf: str | None = None, offload: bool = False,
                device: str = "auto", dtype: str = "float32", batch_size: int = 8, overwrite: bool = False,
                progress: bool = True, log: Log = print) -> PruneReport:
    """Prune `model` (a local folder, a .gguf file, a hub id; None: the embedded SmolLM2) and write the checkpoint
    folder `out` with report.json/.md, plan.png and a model card, atomically; return the report.

    heal_tokens: after pruning, distill the dense model into the pruned one on this many tokens of the
        calibration text's calibration split.
    export: the checkpoint format, "flap" (any plan), "hf-uniform" (a stock class; uniform plans) or "vllm" (the
        flap checkpoint, its family checked to serve in vLLM).
    gguf: also write model-TYPE.gguf into `out` (f16, q8_0, or a llama-quantize type such as Q4_K_M); without
        config.align, the MLP widths are aligned for the type.
    offload: stream the model layer by layer from disk (no evaluation, healing or GGUF then).
    log: where progress messages go (None: nowhere); progress: progress bars.
    """
    from .export import gguf_alignment
    config = PruneConfig() if config is None else config
    out, gguf = check_prune(model, config, out, export=export, heal_tokens=heal_tokens, gguf=gguf, offload=offload,
                            batch_size=batch_size, overwrite=overwrite)
    device, lead = _device(device)
    if not lead:
        progress, evaluation, log = False, NO_EVALUATION, None
    if offload:
        if evaluation.perplexity or evaluation.tasks:
            _say(log, "--offload: the model is never whole in memory, so no evaluation runs; evaluate the result "
                      "with `flap-llm eval` if it fits")
        return _prune_offloaded(model, config, out, calibration, export, device, dtype, batch_size, overwrite,
                                progress, log)

    import time

    from . import prune
    from .atomic import check_destination
    from .model.checkpoint import save_pruned
    from .calibration.data import calibration_windows
    from .engine import check_model
    from .model.models import load_model
    t0 = time.perf_counter()
    net, tokenizer, path = load_model(model, dtype, device, progress, prunable=True)
    check_destination(out, overwrite, [path, getattr(net.config, "flap_source", None)])
    if getattr(net.config, "flap_layers", None):
        raise FlapError(f"{path} is already pruned; prune the original dense model instead")
    from .methods import registry
    if gguf and config.align is None and registry.get(config.method).widths:  # ffn_down's rows take the type whole
        multiple = gguf_alignment(gguf)
        if multiple and multiple < net.config.intermediate_size:
            config = dataclasses.replace(config, align=multiple)
            _say(log, f"aligning each layer's kept MLP channels to a multiple of {multiple} for {gguf} "
                      "(--align sets another)")
    check_model(net, config)
    from .export.registry import get_format
    get_format(export).check(net)  # a format that can't hold this family refuses before the pruning run (the
    # checkpoint writer checks again; the offloaded path makes its writer before the walk)
    if gguf:  # refuse an architecture GGUF cannot express before the pruning run, not after
        from .export.gguf_file import check_exportable, check_plan_exportable
        check_exportable(net, gguf)
        check_plan_exportable(net, config)
    load_s = time.perf_counter() - t0
    calib = calibration_windows(calibration.text, tokenizer, calibration.nsamples, calibration.seqlen,
                                calibration.seed) if config.needs_data else None
    _warn_long_windows(net, max(calibration.seqlen, evaluation.seqlen))
    ppl_before = evaluation.ppl(net, tokenizer, batch_size, progress)
    zs_before = evaluation.zeroshot(net, tokenizer, batch_size, progress)
    _say(log, f"pruning {path} ({config.label}, ratio {config.ratio})")
    calib_spec = calibration.to_dict(tokenizer)
    extra = {"seed": calibration.seed, "calibration": calib_spec}
    context = {"model": path, "device": device, "dtype": dtype, "seed": calibration.seed, "calibration": calib_spec,
               "load_s": load_s, "title": f"{Path(path).name}: {config.label} {config.ratio:.0%}"}
    teacher = None
    if heal_tokens:  # the dense model teaches the pruned one (in bf16 on a GPU: distill.teacher_dtype)
        from .healing.distill import teacher_copy, teacher_dtype
        teacher = teacher_copy(net, teacher_dtype(device, next(net.parameters()).dtype))
    result = prune(net, calib, config, batch_size=batch_size, progress=progress)
    if teacher is not None:
        extra["heal"] = _heal_after_prune(net, teacher, tokenizer, calibration, heal_tokens, evaluation, batch_size,
                                          progress, log)
        del teacher
    ppl_after = evaluation.ppl(net, tokenizer, batch_size, progress)
    if "heal" in extra:
        _warn_if_healing_hurt(extra["heal"]["ppl_before_heal"], ppl_after, evaluation.text)
    zs_after = evaluation.zeroshot(net, tokenizer, batch_size, progress)
    ppl = None if not evaluation.perplexity else {"spec": evaluation.text, "seqlen": evaluation.seqlen,
                                                  "limit": evaluation.limit, "ppl_before": ppl_before,
                                                  "ppl_after": ppl_after}
    zeroshot = None if not evaluation.tasks else {"before": zs_before, "after": zs_after}
    report = _report(context, result, ppl, zeroshot)
    if "heal" in extra:
        report = report.with_evaluation(heal=extra["heal"])
    extra["metrics"] = {"perplexity": ppl, "zeroshot": zeroshot}
    if not lead:
        return report

    def before_commit(folder: Path) -> None:
        nonlocal report
        if gguf:
            from .export import save_gguf
            gguf_path = save_gguf(net, folder / f"model-{gguf}.gguf", tokenizer, gguf, progress=progress)
            report = report.with_evaluation(gguf=_gguf_report(gguf_path, gguf, evaluation, log))
        _write_reports(folder, report, result, out.name, export)

    save_pruned(net, out, tokenizer=tokenizer, result=result, format=export, overwrite=overwrite, extra=extra,
                before_commit=before_commit)
    _say(log, report.summary())
    _say(log, f"saved the pruned model and reports to {out}")
    return report


def check_prune(model, config: PruneConfig, out, *, export: str = "flap", heal_tokens: int | None = None,
                gguf: str | None = None, offload: bool = False, batch_size: int = 8,
                overwrite: bool = False) -> tuple[Path, str | None]:
    """Everything about a prune_model call that can be refused before anything is loaded; the output folder and
    the GGUF type in llama.cpp's spelling (its tools checked for a type llama-quantize makes)."""
    from .calibration import distributed
    from .atomic import check_destination
    from .export.registry import get_format
    from .export.gguf_file import usable_type
    from .methods import registry
    if not isinstance(config, PruneConfig):
        raise FlapError("config must be a flap_llm.PruneConfig")
    if batch_size < 1:
        raise FlapError("--batch-size must be at least 1")
    fmt = get_format(export)  # an unknown name is refused here
    if export == "hf-uniform" and not config.uniform:
        raise FlapError(f"--export hf-uniform needs every layer to keep the same shapes, which this plan "
                        f"({config.label}) does not give; use --method flap --structure UL-UM (or UL-MM), or --export "
                        "flap")
    if heal_tokens is not None and (heal_tokens < 1 or offload or config.mode == "mask"):
        raise FlapError("--heal-tokens needs a positive number of tokens, the model in memory and mode prune; "
                        "drop --offload/--mode mask, or heal the checkpoint afterwards with `flap-llm heal`")
    if gguf and (offload or config.mode == "mask"):
        raise FlapError("--gguf needs the pruned model in memory and mode prune; drop --offload/--mode mask and "
                        "export the checkpoint afterwards with `flap-llm export`")
    if offload and not registry.get(config.method).streams:
        raise FlapError(f"--method {config.method} needs the whole model in memory; drop --offload")
    if offload and (not fmt.streams or int(os.environ.get("WORLD_SIZE", "1")) > 1 or distributed.active()):
        raise FlapError("--offload writes format flap (or vllm) in a single process; drop --export hf-uniform/torchrun")
    out = Path(out).expanduser()
    sources = [model] if model and Path(model).expanduser().exists() else []
    check_destination(out, overwrite, sources)
    return out, usable_type(gguf) if gguf else None


def _prune_offloaded(model, config: PruneConfig, out: Path, calibration: Calibration, export: str, device: str,
                     dtype: str, batch_size: int, overwrite: bool, progress: bool, log: Log) -> PruneReport:
    """The model streamed from its safetensors files, one decoder layer at a time (no evaluation)."""
    import time

    from .atomic import check_destination
    from .calibration.data import calibration_windows
    from .model.devices import parse_dtype
    from .model.models import load_tokenizer, resolve_model
    from .calibration.offload import prune_offloaded
    t0 = time.perf_counter()
    path, pruned = resolve_model(model, progress)
    if pruned or not Path(path).is_dir():
        raise FlapError(f"--offload needs a dense local model folder (or .gguf file); got {path}")
    check_destination(out, overwrite, [path])
    tokenizer = load_tokenizer(path)
    load_s = time.perf_counter() - t0
    calib = calibration_windows(calibration.text, tokenizer, calibration.nsamples, calibration.seqlen,
                                calibration.seed) if config.needs_data else None
    _say(log, f"pruning {path} ({config.label}, ratio {config.ratio})")
    calib_spec = calibration.to_dict(tokenizer)
    context = {"model": path, "device": device, "dtype": dtype, "seed": calibration.seed, "calibration": calib_spec,
               "load_s": load_s, "title": f"{Path(path).name}: {config.label} {config.ratio:.0%}"}
    reports: dict = {}

    def before_commit(folder: Path, result) -> None:
        reports["report"] = _report(context, result, None, None)
        _write_reports(folder, reports["report"], result, out.name, export)

    prune_offloaded(path, calib, config, out, format=export, tokenizer=tokenizer, device=device, dtype=parse_dtype(dtype),
                    batch_size=batch_size, progress=progress, overwrite=overwrite,
                    extra={"seed": calibration.seed, "calibration": calib_spec}, before_commit=before_commit)
    report = reports["report"]
    _say(log, report.summary())
    _say(log, f"saved the pruned model and reports to {out}")
    return report


def _warn_long_windows(model, longest: int) -> None:
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos and longest > max_pos:
        warnings.warn(f"windows of {longest} tokens are longer than the model's {max_pos} positions; its outputs "
                      "there are not meaningful", stacklevel=3)


def _heal_after_prune(model, teacher, tokenizer, calibration: Calibration, tokens: int, evaluation: Evaluation,
                      batch_size: int, progress: bool, log: Log) -> dict:
    from .healing.distill import HealConfig, heal
    cfg = HealConfig(tokens=tokens, batch_size=batch_size, seed=calibration.seed)
    data = heal_windows(tokenizer, calibration.text, tokens, calibration.seqlen, calibration.seed)
    ppl_pruned = evaluation.ppl(model, tokenizer, batch_size, progress)
    _say(log, f"healing: distilling the dense model into the pruned one on {tokens} tokens of {calibration.text}")
    result = heal(model, teacher, data, cfg, progress=progress)
    return {**result.to_dict(), "data": {"train": f"{calibration.text} (calibration split)", "windows": list(data.shape)},
            "ppl_before_heal": ppl_pruned}


def heal_windows(tokenizer, spec: str, tokens: int, seqlen: int, seed: int):
    """Training windows of the texts' calibration splits (the evaluation splits are never trained on)."""
    from .calibration.data import training_windows
    return training_windows(spec, tokenizer, -(-tokens // seqlen), seqlen, seed)


def _warn_if_healing_hurt(before: float | None, after: float | None, spec: str) -> None:
    """A short heal of a model already close to dense can raise its held-out perplexity (measured: Qwen2.5-Coder-
    0.5B, obs at 20%, 32k tokens); the user should know before deploying it."""
    if before is not None and after is not None and after > before:
        warnings.warn(f"healing raised the held-out perplexity on {spec} from {before:.2f} to {after:.2f}; the model "
                      "before healing measured better (heal on more tokens, or prune without healing)", stacklevel=3)


def _gguf_report(path: Path, qtype: str, evaluation: Evaluation, log: Log) -> dict:
    """The deployed file's type and size, and llama.cpp's own perplexity of it on the evaluation text (its
    convention: windows of the evaluation's seqlen, the second half of each scored); None without llama.cpp's
    tools or without perplexity."""
    out = {"file": path.name, "type": qtype, "bytes": path.stat().st_size, "llama_perplexity": None}
    from .export.llamacpp import bin_dir
    if not evaluation.perplexity or bin_dir() is None:
        out["llama_perplexity_skipped"] = "--no-eval" if not evaluation.perplexity else \
            "llama.cpp's tools are not installed"
        return out
    import tempfile

    from .calibration.data import load_texts
    from .export.llamacpp import perplexity
    _say(log, f"measuring {path.name} with llama.cpp's llama-perplexity on {evaluation.text}")
    with tempfile.TemporaryDirectory() as d:
        text = Path(d) / "eval.txt"
        text.write_text("\n\n".join(load_texts(evaluation.text, "eval")))
        out["llama_perplexity"] = perplexity(path, text, evaluation.seqlen, evaluation.limit or -1)
    out.update(llama_perplexity_spec=evaluation.text, llama_perplexity_ctx=evaluation.seqlen)
    return out


def _report(context: dict, result, evaluation: dict | None, zeroshot: dict | None) -> PruneReport:
    fields = {k: v for k, v in context.items() if k != "load_s"}
    fields["calibration"] = {**(result.report.calibration or {}), **context["calibration"]}  # source and windows
    return result.report.with_evaluation(**fields, perplexity=evaluation, zeroshot=zeroshot, plan=result.plan.to_dict(),
                                         timings_s={"load": context["load_s"], **result.report.timings_s})


def _write_reports(folder: Path, report: PruneReport, result, name: str, export: str) -> None:
    """report.json, report.md, plan.png and the model card (README.md) into the checkpoint folder."""
    from .atomic import write_json
    from .reporting.modelcard import model_card
    from .reporting.plot import plot_plan
    write_json(folder / "report.json", report.to_dict())
    (folder / "report.md").write_text(report.to_markdown())
    cfg = report["dense_shape"]
    plot_plan(result.plan.kept_counts(), cfg["num_attention_heads"], cfg["intermediate_size"], folder / "plan.png",
              report["title"])
    (folder / "README.md").write_text(model_card(report.to_dict(), name, export))


def heal_model(model: str | os.PathLike, out: str | os.PathLike, *, teacher: str | None = None,
               data: str = "builtin:wiki", config=None, seqlen: int = 128, evaluation: Evaluation = Evaluation(),
               device: str = "auto", dtype: str = "float32", overwrite: bool = False, resume: bool = False,
               progress: bool = True, log: Log = print) -> dict:
    """Distill the dense model into the pruned checkpoint `model` and write the healed checkpoint `out`
    (heal_report.json, the model card), atomically; return the heal report.

    teacher: the dense model (default: the base model the checkpoint's manifest names); data: the training
    text(s), comma-separated; config: a distill.HealConfig (tokens, method, learning rate, ...); resume: continue
    from the resume checkpoint that config.checkpoint_every wrote beside `out`.
    """
    from .calibration import distributed
    from . import load_pruned
    from .atomic import check_destination, write_json
    from .model.checkpoint import save_pruned
    from .healing.distill import HealConfig, check_pair, heal, teacher_dtype
    from .model.models import load_model, load_tokenizer
    config = HealConfig() if config is None else config
    source, teacher_name, manifest = check_heal(model, teacher, config, seqlen)
    out = Path(out).expanduser()
    check_destination(out, overwrite, [source, teacher_name])
    state_dir = heal_state_dir(out)
    if resume and not (state_dir / _state_name(config)).exists():
        raise FlapError(f"nothing to resume: no {'sharded ' if config.shard else ''}resume checkpoint in {state_dir} "
                        "(run with --checkpoint-every N first, with the same --shard)")
    device, lead = _device(device)
    if not lead:
        progress, evaluation, log = False, NO_EVALUATION, None
    student = load_pruned(source, device=device)
    tokenizer = load_tokenizer(str(source))
    dense, _, teacher_path = load_model(teacher_name, teacher_dtype(device, dtype), device, progress)
    check_pair(student, dense)
    windows = heal_windows(tokenizer, data, config.tokens, seqlen, config.seed)
    batch = config.batch_size
    ppl_before = evaluation.ppl(student, tokenizer, batch, progress)
    zs_before = evaluation.zeroshot(student, tokenizer, batch, progress)
    _say(log, f"healing {source} from {teacher_path} on {windows.shape[0]} windows x {seqlen} tokens of {data}")
    result = heal(student, dense, windows, config, progress=progress,
                  checkpoint_dir=state_dir if (config.checkpoint_every or resume) else None, resume=resume)
    del dense
    ppl_after = evaluation.ppl(student, tokenizer, batch, progress)
    zs_after = evaluation.zeroshot(student, tokenizer, batch, progress)
    report = {**result.to_dict(), "world_size": distributed.world_size(),
              "zeroshot": None if not evaluation.tasks else {"before": zs_before, "after": zs_after},
              "model": str(source), "teacher": str(teacher_path),
              "data": {"train": f"{data} (calibration split)", "windows": list(windows.shape),
                       "eval": None if not evaluation.perplexity else f"{evaluation.text} (held-out split)"},
              "perplexity": None if not evaluation.perplexity else {
                  "spec": evaluation.text, "seqlen": evaluation.seqlen, "limit": evaluation.limit,
                  "before": ppl_before, "after": ppl_after}}
    if not lead:
        return report
    keep = {k: manifest[k] for k in ("prune_config", "plan", "report", "seed", "calibration", "metrics") if k in manifest}

    def before_commit(folder: Path) -> None:
        write_json(folder / "heal_report.json", report)
        if "report" in manifest:  # pruned by prune_model: the card gives the prune's numbers and the healing's
            from .reporting.modelcard import model_card
            metrics = manifest.get("metrics") or {}
            card = {**manifest["report"], "model": manifest.get("base_model", {}).get("name_or_path"),
                    "calibration": {**(manifest["report"].get("calibration") or {}), **(manifest.get("calibration") or {})},
                    "perplexity": metrics.get("perplexity"), "zeroshot": metrics.get("zeroshot"), "heal": report}
            (folder / "README.md").write_text(model_card(card, out.name, manifest.get("format", "flap")))

    save_pruned(student, out, tokenizer=tokenizer, overwrite=overwrite, extra={**keep, "heal": report},
                before_commit=before_commit)
    if state_dir.exists():
        import shutil
        shutil.rmtree(state_dir, ignore_errors=True)
    if ppl_before is not None:
        _say(log, f"perplexity ({evaluation.text}): {ppl_before:.2f} before, {ppl_after:.2f} after healing")
    _warn_if_healing_hurt(ppl_before, ppl_after, evaluation.text)
    _say(log, f"healed {result.tokens} tokens in {result.seconds:.0f} s ({result.tokens_per_s:.0f} tokens/s); "
              f"saved to {out}")
    return report


def check_heal(model, teacher: str | None, config, seqlen: int, planning: bool = False) -> tuple[Path, str, dict]:
    """What heal_model refuses before loading anything: the checkpoint folder, the teacher's name (from the
    manifest unless given) and the manifest. `planning` (a dry run) allows --shard outside torchrun."""
    from .model.checkpoint import read_manifest
    from .healing.distill import HealConfig
    if not isinstance(config, HealConfig):
        raise FlapError("config must be a flap_llm.HealConfig")
    if seqlen < 2:
        raise FlapError("--seqlen must be at least 2")
    if config.shard and not planning and int(os.environ.get("WORLD_SIZE", "1")) < 2:
        raise FlapError("--shard shards the student over the processes of torch.distributed; run it under torchrun "
                        "with 2 or more processes (torchrun --nproc-per-node N -m flap_llm heal --shard ...), or drop "
                        "--shard")
    source = Path(model).expanduser()
    if not source.is_dir():
        raise FlapError(f"--model {source} is not a folder; give a pruned checkpoint (the --out of flap-llm prune)")
    manifest = read_manifest(source)
    teacher_name = teacher or manifest.get("base_model", {}).get("name_or_path")
    if not teacher_name:
        raise FlapError(f"{source}'s manifest names no base model; give the dense model with --teacher")
    return source, teacher_name, manifest


def heal_state_dir(out: Path) -> Path:
    """Where heal_model keeps its resume checkpoint: a hidden folder beside the output."""
    return out.parent / f".{out.name}.heal-state"


def _state_name(config) -> str:
    from .healing.distill import SHARDED_STATE, STATE_FILE
    return SHARDED_STATE if config.shard else STATE_FILE


def evaluate_model(model: str | None, evaluation: Evaluation = Evaluation(), *, json_path: str | None = None,
                   md_path: str | None = None, device: str = "auto", dtype: str = "float32", batch_size: int = 8,
                   progress: bool = True) -> dict:
    """Perplexity and zero-shot accuracy of any model, dense or pruned; printed, and written to `json_path` /
    `md_path` (atomically) when given."""
    import json

    from .atomic import check_writable_parent, write_text_atomic
    from .model.devices import pick_device
    from .model.models import load_model
    from .reporting.report import versions, zeroshot_markdown
    for name, flag in ((json_path, "--json"), (md_path, "--md")):  # writable before the evaluation starts
        if name is not None:
            path = Path(name).expanduser()
            if path.is_dir():
                raise FlapError(f"{flag} {path} is a folder; give a file name")
            if not path.resolve().parent.is_dir():
                raise FlapError(f"{flag} {path}: the folder {path.resolve().parent} does not exist")
            check_writable_parent(path)
    if not evaluation.perplexity and not evaluation.tasks:
        raise FlapError("nothing to evaluate: give --tasks or drop --no-ppl")
    net, tokenizer, path = load_model(model, dtype, pick_device(device), progress)
    res: dict = {"model": path, "versions": versions()}
    if evaluation.perplexity:
        from .eval.evaluate import perplexity
        ppl = perplexity(net, tokenizer, evaluation.text, evaluation.seqlen, batch_size, evaluation.limit, progress)
        res["perplexity"] = ppl
        print(f"perplexity {ppl['ppl']:.3f} on {ppl['spec']} ({ppl['windows']} windows of {ppl['seqlen']} tokens)")
    zs = evaluation.zeroshot(net, tokenizer, batch_size, progress)
    if zs is not None:
        res["zeroshot"] = zs
        print(zeroshot_markdown({"model": zs}))
    if json_path:
        write_text_atomic(Path(json_path).expanduser(), json.dumps(res, indent=2, default=str) + "\n")
    if md_path:
        write_text_atomic(Path(md_path).expanduser(), f"# flap-llm evaluation of `{path}`\n\n" + (
            f"Perplexity {res['perplexity']['ppl']:.3f} on {evaluation.text}\n\n" if "perplexity" in res else "")
            + (zeroshot_markdown({"model": zs}) if zs else "") + "\n")
    return res
