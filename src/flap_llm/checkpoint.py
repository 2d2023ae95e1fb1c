"""Pruned checkpoints that reload in one call, and load in stock transformers.

Format "flap": safetensors weights, config.json (the base config plus per-layer shapes in
`flap_layers` and an `auto_map` to modeling_flap.py, copied beside the weights so that
`AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` works without flap_llm),
tokenizer files and flap_manifest.json. Format "hf-uniform": a plain checkpoint of a stock
architecture, for plans in which every layer has the same shapes.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from . import modeling_flap
from .arch import (ARCHITECTURES, applied_window, architecture_of, config_head_dim, decoder_layers, dims_of, input_projs,
                   model_params, spec_of)
from .errors import DiskFullError, FlapError
from .report import versions

MANIFEST = "flap_manifest.json"
FORMAT_VERSION = 1
FORMATS = ("flap", "hf-uniform")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin")) or sorted(folder.glob("*.gguf"))


def base_model_info(model: nn.Module) -> dict:
    """Where the dense model came from: a local folder (with sha256 of its weights) or a hub id."""
    source = getattr(model.config, "flap_source", None) or getattr(model.config, "_name_or_path", "") or ""
    info: dict = {"name_or_path": str(source)}
    p = Path(str(source))
    if source and p.exists():
        files = [p] if p.is_file() else weight_files(p)
        info["sha256"] = {f.name: _sha256(f) for f in files}
    return info


def check_destination(path: Path, overwrite: bool, sources: list[str | Path] = ()) -> None:
    """Refuse a destination that is a source model, or a non-empty folder unless overwriting."""
    dest = path.resolve()
    for src in sources:
        if not src:
            continue
        s = Path(src).resolve()
        if s.exists() and (dest == s or (s.is_file() and dest == s.parent) or s.is_relative_to(dest)):
            raise FlapError(f"refusing to write into {path}: it holds the source model; choose another output folder")
        if s.is_dir() and (s / "config.json").is_file() and dest.is_relative_to(s):
            raise FlapError(f"refusing to write {path} inside the source model's folder {s}; choose a folder outside it")
    if Path.cwd().resolve().is_relative_to(dest):
        raise FlapError(f"{path} is the current folder (or holds it) and cannot be replaced; choose a new output folder")
    if path.exists() and not path.is_dir():
        raise FlapError(f"{path} exists and is not a folder; choose another output folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FlapError(f"{path} exists and is not empty; choose another folder or pass overwrite=True (--overwrite)")
    check_writable_parent(dest)


def check_writable_parent(path: Path) -> None:
    """The nearest existing ancestor of `path` must be a folder we can write into (checked before any work)."""
    parent = Path(path).resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise FlapError(f"cannot create {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise FlapError(f"cannot write {path}: no write permission in {parent}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def temp_sibling(path: Path) -> Path:
    """A temporary name beside `path` that records our pid; temporaries of `path` left by a killed run
    (their pid no longer alive) are removed first."""
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        pid = stale.name.rsplit(".tmp-", 1)[1].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    return path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def pause_before_commit() -> None:
    """For the signal tests: with $FLAP_LLM_TEST_PAUSE set to a file name, touch that file and wait to be
    signalled, at the point where a complete temporary output is about to be renamed into place."""
    marker = os.environ.get("FLAP_LLM_TEST_PAUSE")
    if not marker:
        return
    Path(marker).touch()
    for _ in range(1200):  # at most a minute, then carry on
        time.sleep(0.05)


def _size(path: Path) -> int:
    """Bytes of a file, or of every file under a folder (0 when it is gone)."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def _human(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} bytes"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"


# How the writers we use say "disk full" when they do not raise OSError(ENOSPC) themselves: safetensors (Rust's
# io::Error text), numpy's tofile under the gguf package (it checks the free space before a large tensor).
_FULL_WORDS = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122",
               "Not enough free space to write")
_NEARLY_FULL = 1 << 20  # bytes: a write that failed with less than this free found the disk full


def _is_disk_full(e: BaseException, where: Path | None = None) -> bool:
    """Whether `e` (or an error it was raised from) says the disk is full; with `where`, also an error whose
    writer gave no reason (torch.save's "file write failed", llama-quantize's exit status) while `where`'s
    filesystem has under 1 MiB free. Interruptions (Ctrl-C, SIGTERM) are never a full disk."""
    if not isinstance(e, Exception):
        return False
    seen, err = set(), e
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(w in str(err) for w in _FULL_WORDS):
            return True
        err = err.__cause__ or err.__context__
    if where is None:
        return False
    try:
        return shutil.disk_usage(where).free < _NEARLY_FULL
    except OSError:
        return False


def _disk_full(path: Path, what: str, written: int, needed: int | None) -> DiskFullError:
    """The one-line error for a write that filled the disk (after its temporary output was removed)."""
    free = shutil.disk_usage(path.parent).free
    need = (f"it needs about {_human(needed)}" if needed and needed > written
            else f"it needs more than the {_human(written)} written before the disk filled" if written
            else "it needs more than is free")
    return DiskFullError(f"the disk filled while writing {what} to {path}: {need}, and {_human(free)} is free there; "
                         "nothing partial was left. Free some space or write elsewhere")


@contextmanager
def atomic_folder(path: Path, what: str = "the output folder", needed: int | None = None):
    """Yield a temporary sibling folder; on success it replaces `path`, on error nothing is left. A full disk
    ends in a DiskFullError naming `what` and the `needed` bytes (an estimate, if known)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    tmp.mkdir()
    try:
        yield tmp
        pause_before_commit()
    except BaseException as e:  # errors, Ctrl-C and (through the CLI's handler) SIGTERM: no temporary output left
        full = _is_disk_full(e, path.parent)
        written = _size(tmp) if full else 0
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise _disk_full(path, what, written, needed) from e
        raise
    old = None
    if path.exists():
        old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


@contextmanager
def atomic_file(path: Path, what: str = "the output file", needed: int | None = None, shown: Path | None = None):
    """Yield a temporary name beside `path`; once the block has written it, it is renamed to `path`.
    On any error or interruption the temporary file is removed and `path` is left as it was; a full disk ends
    in a DiskFullError naming `what`, the file it is for (`shown`, when `path` is itself a temporary) and the
    `needed` bytes (an estimate, if known)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        yield tmp
        pause_before_commit()
        os.replace(tmp, path)
    except BaseException as e:
        full = _is_disk_full(e, path.parent)
        written = _size(tmp) if full else 0
        tmp.unlink(missing_ok=True)
        if full:
            raise _disk_full(shown or path, what, written, needed) from e
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """Write a file under a temporary name and rename it: a reader never sees half of it."""
    with atomic_file(path, needed=len(text.encode())) as tmp:
        tmp.write_text(text)


def _is_uniform(shapes: list[dict]) -> bool:
    return all(s == shapes[0] for s in shapes)


def _uniform_export(model: nn.Module) -> nn.Module:
    """A stock-architecture copy of a uniformly pruned model, with identical logits."""
    from transformers import AutoConfig, AutoModelForCausalLM

    shapes = getattr(model.config, "flap_layers", None)
    arch = architecture_of(model)
    if shapes and not _is_uniform(shapes):
        raise FlapError("format='hf-uniform' needs every layer to keep the same shapes, but this plan is not "
                        "uniform (use structure UL-UM or UL-MM with remove_heads a multiple of the layers, "
                        "or save with format='flap')")
    cfg = model.config.to_dict()
    for key in ("flap_layers", "flap_mode", "flap_source", "auto_map", "architectures", "_name_or_path"):
        cfg.pop(key, None)
    spec = spec_of(model)
    s = shapes[0] if shapes else None
    if s is not None:
        if s["num_attention_heads"] == 0:
            raise FlapError("format='hf-uniform' cannot express layers without attention heads; use format='flap'")
        if model.config.hidden_size % s["num_attention_heads"]:
            raise FlapError(f"format='hf-uniform': stock transformers refuses {s['num_attention_heads']} attention heads "
                            f"with hidden_size {model.config.hidden_size} (not a multiple), so no stock checkpoint can "
                            "hold this plan; save with format='flap' or export a GGUF (flap_llm.save_gguf)")
        cfg.update(num_attention_heads=s["num_attention_heads"], num_key_value_heads=s["num_key_value_heads"],
                   intermediate_size=s["intermediate_size"], head_dim=config_head_dim(model.config))
    target = spec.uniform_class or arch
    if target != arch:
        # the stock class holds the same computation with biases (LLaMA for Qwen2 and Mistral), but no window
        if applied_window(model) is not None:
            raise FlapError(f"{arch} with a sliding window cannot be exported as a biased {target}; use format='flap'")
        import transformers

        target_spec = ARCHITECTURES[target]
        q_bias = input_projs(decoder_layers(model, spec)[0], spec, "attn")[0].bias is not None  # Qwen2's q/k/v
        cfg[target_spec.uniform_bias_keys[0]] = q_bias
        cfg["model_type"] = getattr(transformers, target).config_class.model_type
    else:
        target_spec = spec
    for key, flag, what in zip(target_spec.uniform_bias_keys, ("o_proj_bias", "down_proj_bias"), ("attention", "MLP")):
        if not (s and s[flag]):
            continue
        if key is None:
            raise FlapError(f"the stock {target} has no {what} output bias, so the compensation cannot be stored in "
                            "format 'hf-uniform'; use format='flap' or compensation='none'")
        cfg[key] = True
    model_type = cfg.pop("model_type")
    config = AutoConfig.for_model(model_type, **cfg)
    config.architectures = [target]
    out = AutoModelForCausalLM.from_config(config, dtype=next(model.parameters()).dtype)
    state = model.state_dict()
    full = out.state_dict()
    missing = [k for k in full if k not in state]
    if any(not k.endswith(".bias") for k in missing):
        raise FlapError(f"cannot map this model onto a stock {target}: missing {missing[:3]}")
    for k in missing:  # biases the stock config adds but the model does not use: exact zeros
        state[k] = torch.zeros_like(full[k])
    unexpected = [k for k in state if k not in full]
    if unexpected:
        raise FlapError(f"cannot map this model onto a stock {target}: it would drop {unexpected[:3]}")
    out.load_state_dict(state, strict=True)
    return out


class ShardWriter:
    """Writes a checkpoint's weights as numbered safetensors shards plus the index, one group of tensors at a
    time (a streamed model's layers)."""

    def __init__(self, folder: Path, n_shards: int):
        self.folder, self.n_shards, self.count = folder, n_shards, 0
        self.weight_map: dict[str, str] = {}
        self.total_size = 0

    def write(self, tensors: dict[str, torch.Tensor]) -> None:
        self.count += 1
        if self.count > self.n_shards:
            raise RuntimeError("more shards written than announced")
        name = f"model-{self.count:05d}-of-{self.n_shards:05d}.safetensors"
        cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        save_file(cpu, str(self.folder / name), metadata={"format": "pt"})
        for k, v in cpu.items():
            self.weight_map[k] = name
            self.total_size += v.numel() * v.element_size()

    def finish(self) -> None:
        if self.count != self.n_shards:
            raise RuntimeError(f"wrote {self.count} of {self.n_shards} shards")
        index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


class CheckpointWriter:
    """The one writer of pruned checkpoints, for a model in memory (`save_pruned`) and for one streamed
    layer by layer (offload.py). The destination is checked when the writer is made, before any work;
    everything is written into a temporary sibling folder that replaces the destination only once complete.

        writer = CheckpointWriter(path, model, format, overwrite)   # checks now
        with writer.open():
            writer.save_model(model)  # or: shards = writer.shards(n); ...; writer.save_config(config)
            writer.finish(model, tokenizer, result, extra, before_commit)
    """

    def __init__(self, path: str | os.PathLike, model: nn.Module, format: str = "flap", overwrite: bool = False,
                 sources: list[str | Path] = ()):
        if format not in FORMATS:
            raise FlapError(f"unknown checkpoint format {format!r}; choose one of: {', '.join(FORMATS)}")
        self.path, self.format = Path(path), format
        self.base = base_model_info(model)
        check_destination(self.path, overwrite, [self.base["name_or_path"], *sources])
        # about what the weights take on disk (an upper bound: a pruned model is smaller, tied tensors count twice)
        self.needed = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        self.folder: Path | None = None
        self.parameters: int | None = None

    @contextmanager
    def open(self):
        with atomic_folder(self.path, "the pruned checkpoint", self.needed) as tmp:
            self.folder = tmp
            yield self
        self.folder = None

    def save_model(self, model: nn.Module) -> None:
        """Weights and config of a model in memory (a stock-architecture copy for format hf-uniform)."""
        export = _uniform_export(model) if self.format == "hf-uniform" else model
        export.save_pretrained(self.folder, safe_serialization=True)
        self.parameters = model_params(export)

    def shards(self, n_shards: int) -> ShardWriter:
        """Weights written group by group; call save_config afterwards."""
        if self.format != "flap":
            raise FlapError("a streamed model is written in format 'flap'")
        return ShardWriter(self.folder, n_shards)

    def save_config(self, model: nn.Module) -> None:
        model.config.save_pretrained(self.folder)
        self.parameters = model_params(model)

    def finish(self, model: nn.Module, tokenizer=None, result=None, extra: dict | None = None,
               before_commit: Callable[[Path], None] | None = None) -> None:
        """Everything beside the weights: flap config and modeling file, tokenizer, manifest, extra files."""
        folder = self.folder
        if self.format == "flap":
            _write_flap_config(folder / "config.json", model, spec_of(model))
            shutil.copyfile(modeling_flap.__file__, folder / "modeling_flap.py")
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        manifest = {
            "format": self.format,
            "format_version": FORMAT_VERSION,
            "architecture": architecture_of(model),
            "base_model": self.base,
            "parameters": self.parameters,
            "layers": getattr(model.config, "flap_layers", None),
            "versions": versions(),
        }
        if result is not None:
            manifest.update(prune_config=result.config.to_dict(), plan=result.plan.to_dict(),
                            report={k: v for k, v in result.report.to_dict().items() if k != "versions"})
        manifest.update(extra or {})
        write_json(folder / MANIFEST, manifest)
        if before_commit is not None:
            before_commit(folder)


def save_pruned(model: nn.Module, path: str | os.PathLike, tokenizer=None, result=None, format: str = "flap", *,
                overwrite: bool = False, extra: dict | None = None,
                before_commit: Callable[[Path], None] | None = None) -> Path:
    """Save a pruned model as a checkpoint that `load_pruned` (and stock transformers) reload.

    Writes into a temporary sibling folder and renames it at the end: an error leaves nothing behind,
    and with overwrite=True an existing folder is replaced only once the new checkpoint is complete.
    `before_commit(folder)` may add files (reports, plots) to the checkpoint before it is committed.
    """
    writer = CheckpointWriter(path, model, format, overwrite)
    with writer.open():
        writer.save_model(model)
        writer.finish(model, tokenizer, result, extra, before_commit)
    return Path(path)


def _write_flap_config(config_path: Path, model: nn.Module, spec) -> None:
    cfg = json.loads(config_path.read_text())
    arch = architecture_of(model)
    if not cfg.get("flap_layers"):
        raise FlapError("this model has not been pruned by flap_llm.prune; nothing to save in format 'flap'")
    cls = modeling_flap.flap_class(arch).__name__
    cfg["architectures"] = [cls]
    cfg["flap_base_architecture"] = arch
    cfg["flap_modules"] = {**spec.modules(), "head_dim": dims_of(model).head_dim}
    cfg["auto_map"] = {"AutoModelForCausalLM": f"modeling_flap.{cls}"}
    config_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def read_manifest(path: Path) -> dict:
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise FlapError(f"{path} has no {MANIFEST}; it is not a flap-llm checkpoint (load it with transformers)")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FlapError(f"{mpath} is corrupted ({e}); re-save the checkpoint") from e
    if manifest.get("format_version") != FORMAT_VERSION:
        raise FlapError(f"{path} has checkpoint format version {manifest.get('format_version')!r}; this flap-llm "
                        f"reads version {FORMAT_VERSION}: use the flap-llm version that wrote it")
    if manifest.get("format") not in FORMATS:
        raise FlapError(f"{mpath} names an unknown format {manifest.get('format')!r}")
    return manifest


def load_pruned(path: str | os.PathLike, dtype: torch.dtype | str | None = None,
                device: torch.device | str | None = None) -> nn.Module:
    """Load a checkpoint written by `save_pruned`, with each layer's own shapes."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .devices import check_device, parse_dtype
    dtype = parse_dtype(dtype)
    if device is not None:
        check_device(str(device))
    path = Path(path)
    if not path.is_dir():
        raise FlapError(f"no checkpoint folder at {path}")
    manifest = read_manifest(path)
    if not (path / "config.json").is_file() or not weight_files(path):
        raise FlapError(f"{path} is missing config.json or its safetensors weights; the checkpoint is incomplete")
    try:
        if manifest["format"] == "hf-uniform":
            model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, output_loading_info=True)
        else:
            config = AutoConfig.from_pretrained(path)
            base = getattr(config, "flap_base_architecture", None)
            if base not in ARCHITECTURES or not getattr(config, "flap_layers", None):
                raise FlapError(f"{path}/config.json lacks flap_base_architecture/flap_layers; re-save the checkpoint")
            cls = modeling_flap.flap_class(base)
            model, info = cls.from_pretrained(path, config=config, dtype=dtype, output_loading_info=True)
    except FlapError:
        raise
    except Exception as e:  # the loader's own errors (truncated safetensors, shape mismatches, ...)
        raise FlapError(f"could not load the checkpoint at {path} ({type(e).__name__}: {e}); it may be truncated "
                        "or corrupted: save it again") from e
    problems = [k for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(k)]
    if problems or model_params(model) != manifest.get("parameters"):
        raise FlapError(f"the checkpoint at {path} does not match its manifest ({', '.join(problems) or 'parameter count'}); "
                        "it may be truncated or corrupted: save it again")
    if device is not None:
        model = model.to(device)
    return model.eval()
