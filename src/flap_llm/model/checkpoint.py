"""Pruned checkpoints that reload in one call: the writer (in memory or streamed layer by layer), the manifest
(flap_manifest.json: format, base model with the sha256 of its weights, plan, report, versions) and the loader.
What a format writes beside the weights is the format's own (export/registry.py: "flap", "hf-uniform")."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .arch import architecture_of, model_params
from ..atomic import atomic_folder, check_destination, write_json
from ..errors import FlapError
from ..export.registry import FORMATS as _FORMATS, get_format
from ..reporting.report import versions

MANIFEST = "flap_manifest.json"
FORMAT_VERSION = 1
FORMATS = tuple(_FORMATS)


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
        self.fmt = get_format(format)
        self.fmt.check(model)
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
        export = self.fmt.weights(model)
        export.save_pretrained(self.folder, safe_serialization=True)
        self.parameters = model_params(export)

    def shards(self, n_shards: int) -> ShardWriter:
        """Weights written group by group; call save_config afterwards."""
        if not self.fmt.streams:
            raise FlapError(f"a streamed model cannot be written in format {self.format!r}; use format 'flap'")
        return ShardWriter(self.folder, n_shards)

    def save_config(self, model: nn.Module) -> None:
        model.config.save_pretrained(self.folder)
        self.parameters = model_params(model)

    def finish(self, model: nn.Module, tokenizer=None, result=None, extra: dict | None = None,
               before_commit: Callable[[Path], None] | None = None) -> None:
        """Everything beside the weights: flap config and modeling file, tokenizer, manifest, extra files."""
        folder = self.folder
        self.fmt.files(folder, model)
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
        model, info = get_format(manifest["format"]).loads(path, dtype)
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
