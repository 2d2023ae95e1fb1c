"""Pruning models larger than memory: layer streaming.

Weights are read layer by layer from the safetensors files (memory-mapped), moved to the compute device,
processed and released; the pruned layers are written out layer by layer as checkpoint shards. Peak memory
is about one decoder layer + the calibration activations + the embeddings, not the model. On CUDA only one
layer is on the GPU at a time.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..model.arch import ArchSpec, architecture_of, decoder_layers, get_module, spec_of
from ..atomic import check_destination
from ..model.checkpoint import CheckpointWriter, ShardWriter
from ..config import PruneConfig
from ..engine import PruneResult, check_method_offered, prune
from ..errors import FlapError


class WeightStore:
    """Tensors of a safetensors checkpoint by name, read on demand (one file handle at a time)."""

    def __init__(self, folder: Path):
        self.folder = folder
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            self.files = {k: folder / v for k, v in json.loads(index.read_text())["weight_map"].items()}
        elif (folder / "model.safetensors").is_file():
            with safe_open(folder / "model.safetensors", framework="pt") as f:
                self.files = {k: folder / "model.safetensors" for k in f.keys()}
        else:
            raise FlapError(f"{folder} has no safetensors weights; --offload streams safetensors checkpoints "
                            "(convert the model with save_pretrained first)")

    def names(self) -> list[str]:
        return list(self.files)

    def load(self, names: list[str], device, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.files[n], []).append(n)
        out = {}
        for file, keys in by_file.items():
            with safe_open(file, framework="pt") as f:
                for k in keys:
                    t = f.get_tensor(k)
                    out[k] = t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype)
        return out


class OffloadedLayers:
    """The layer provider of the engine for streamed models: `open` reads one layer's weights onto the
    device and releases them afterwards; `commit` writes the pruned layer to the output shards."""

    def __init__(self, model: nn.Module, spec: ArchSpec, store: WeightStore, device, dtype, writer: ShardWriter,
                 scratch: Path | None = None):
        self.model, self.spec = model, spec
        self.modules = decoder_layers(model, spec)
        self.prefix = spec.layers
        self.store, self.device, self.dtype, self.writer = store, device, dtype, writer
        self.scratch = scratch  # where passes may spill activations that do not fit in memory
        self.peak_layer_bytes = 0

    def __len__(self) -> int:
        return len(self.modules)

    def _names(self, idx: int) -> list[str]:
        p = f"{self.prefix}.{idx}."
        return [n for n in self.store.names() if n.startswith(p)]

    @contextmanager
    def open(self, idx: int):
        layer = self.modules[idx]
        p = f"{self.prefix}.{idx}."
        state = {k[len(p):]: v for k, v in self.store.load(self._names(idx), self.device, self.dtype).items()}
        layer.load_state_dict(state, strict=True, assign=True)
        self.peak_layer_bytes = max(self.peak_layer_bytes, sum(t.numel() * t.element_size() for t in state.values()))
        del state
        try:
            yield layer
        finally:
            layer.to("meta")  # frees the weights; the module keeps its (possibly pruned) shapes

    def commit(self, idx: int, layer: nn.Module) -> None:
        p = f"{self.prefix}.{idx}."
        self.writer.write({p + k: v for k, v in layer.state_dict().items()})

    def info(self) -> dict | None:
        return {"peak_layer_bytes": self.peak_layer_bytes, "device": str(self.device)}

    @contextmanager
    def open_head(self):
        """The model with its final norm and (untied) vocabulary projection read onto the device."""
        loaded = []
        for path in (self.spec.final_norm, self.spec.lm_head):
            module = get_module(self.model, path)
            if not any(p.is_meta for p in module.parameters()):
                continue  # already real: the head tied to the loaded embeddings
            names = [n for n in self.store.names() if n.startswith(path + ".")]
            state = {k[len(path) + 1:]: v for k, v in self.store.load(names, self.device, self.dtype).items()}
            module.load_state_dict(state, strict=True, assign=True)
            loaded.append(module)
        try:
            yield self.model
        finally:
            for module in loaded:
                module.to("meta")


def _has(model: nn.Module, path: str) -> bool:
    try:
        get_module(model, path)
    except AttributeError:
        return False
    return True


def _skeleton(source: Path, dtype: torch.dtype | None, device,
              prune_config: PruneConfig) -> tuple[nn.Module, WeightStore, torch.dtype]:
    """The model with every decoder layer on the meta device, embeddings and rotary tables on `device`; a method
    the family is not offered is refused before any weight is read."""
    from transformers import AutoConfig, AutoModelForCausalLM

    store = WeightStore(source)
    config = AutoConfig.from_pretrained(source)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
    spec = spec_of(model)  # fails clearly for unsupported architectures
    check_method_offered(model, prune_config)
    embed_name = spec.embed + ".weight"
    if embed_name not in store.names():
        raise FlapError(f"{source} has no {embed_name}; is it a {architecture_of(model)} checkpoint?")
    embed = store.load([embed_name], device, dtype)[embed_name]
    if dtype is None:  # the checkpoint's own dtype; rebuilt so that float32 buffers stay float32
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=embed.dtype)
    dtype = embed.dtype
    # The walk runs the embeddings and the rotary tables; their non-persistent buffers (inverse frequencies,
    # Gemma's embedding scale) are computed by transformers' own initialisation, on the device.
    for path in (spec.embed, spec.rotary):
        if path is None or not _has(model, path):
            continue
        module = get_module(model, path)
        module.to_empty(device=device)
        for sub in module.modules():
            model._init_weights(sub)
    get_module(model, spec.embed).load_state_dict({"weight": embed}, assign=True)
    model.tie_weights()  # a tied head (Gemma) shares the loaded embedding again
    model.config.flap_source = str(source)
    return model, store, dtype


def prune_offloaded(source: str | os.PathLike, calibration, config: PruneConfig, out: str | os.PathLike, *,
                    format: str = "flap", tokenizer=None, device: str = "cpu", dtype: torch.dtype | None = None, batch_size: int = 8,
                    progress: bool = False, overwrite: bool = False, extra: dict | None = None,
                    before_commit=None) -> PruneResult:
    """Prune the safetensors checkpoint at `source` into a checkpoint at `out` (format flap, or another format
    that streams), one layer in memory at a time. The source is only read; `out` appears only once it is complete.
    `before_commit(folder, result)` may add files to the checkpoint before it is committed."""
    source, out = Path(source), Path(out)
    if not (source / "config.json").is_file():
        raise FlapError(f"{source} is not a model folder with config.json; --offload needs a local safetensors checkpoint")
    check_destination(out, overwrite, [source])  # before any weight is read
    model, store, dtype = _skeleton(source, dtype, device, config)
    spec = spec_of(model)
    layer_prefix = spec.layers + "."
    others = [n for n in store.names() if not n.startswith(layer_prefix)]
    checkpoint = CheckpointWriter(out, model, format, overwrite, [source])  # checks the format before the walk
    with checkpoint.open():
        shards = checkpoint.shards(model.config.num_hidden_layers + len(others))
        layers = OffloadedLayers(model, spec, store, device, dtype, shards, checkpoint.folder / ".activations")
        result = prune(model, calibration, config, batch_size=batch_size, progress=progress, layers=layers)
        for name in others:  # embeddings, final norm, lm_head: copied through one at a time
            shards.write(store.load([name], "cpu", dtype))
        shards.finish()
        checkpoint.save_config(model)
        commit = (lambda folder: before_commit(folder, result)) if before_commit is not None else None
        checkpoint.finish(model, tokenizer, result, extra, commit)
    return result
