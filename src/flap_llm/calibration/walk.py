"""The calibration walk: capture what every decoder layer receives besides its hidden states (position
embeddings, masks: families such as Gemma 3 give each layer type its own), and layer 0's hidden states; then
run one decoder layer at a time over batched windows. Activation memory is one layer's inputs/outputs, never
a full-model graph."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol, runtime_checkable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..model.arch import ArchSpec, decoder_layers, output_proj
from ..errors import FlapError
from ..math.stats import ChannelStats, Covariance, LayerStats

# One batch of layer inputs: hidden states [B, L, D] and the keyword arguments the model passes to the
# current decoder layer (position embeddings, mask, ...).
LayerInput = tuple[torch.Tensor, dict]


class _Captured(Exception):
    pass


def check_token_ids(ids, vocab_size: int, what: str = "calibration", min_length: int = 1) -> None:
    """Refuse anything but token ids [N, L] (N >= 1, L >= min_length) inside the model's vocabulary."""
    if not isinstance(ids, torch.Tensor) or ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise FlapError(f"{what} must hold integer token ids (a LongTensor [N, L]); tokenize your text first")
    if ids.dim() != 2:
        raise FlapError(f"{what} windows must have shape [N, L], got {tuple(ids.shape)}")
    if ids.shape[0] == 0 or ids.shape[1] < min_length:
        raise FlapError(f"{what} is empty or too short: give windows of shape [N, L] with N >= 1 and L >= {min_length} "
                        f"tokens, got {tuple(ids.shape)}")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        raise FlapError(f"{what} holds token ids in [{lo}, {hi}] but the model's vocabulary is [0, {vocab_size}); "
                        "tokenize with the model's own tokenizer")


def as_batches(calibration: torch.Tensor | Iterable[torch.Tensor], batch_size: int, vocab_size: int) -> list[torch.Tensor]:
    """Validate calibration token ids ([N, L] or an iterable of [B, L]) and cut them into batches."""
    if batch_size < 1:
        raise FlapError(f"batch_size must be at least 1, got {batch_size}")
    if isinstance(calibration, torch.Tensor):
        chunks = [calibration]
    else:
        try:
            chunks = list(calibration)
        except TypeError as e:
            raise FlapError("calibration must be a LongTensor [N, L] of token ids or an iterable of [B, L] batches") from e
    if not chunks:
        raise FlapError("calibration is empty; give at least one window of token ids")
    for c in chunks:
        check_token_ids(c, vocab_size)
    lengths = {c.shape[1] for c in chunks}
    if len(lengths) != 1:
        raise FlapError(f"all calibration windows must have the same length, got lengths {sorted(lengths)}")
    ids = torch.cat([c.long() for c in chunks])
    return list(ids.split(batch_size))


@torch.no_grad()
def capture_inputs(model: nn.Module, spec: ArchSpec, batches: list[torch.Tensor]) -> tuple[list[LayerInput], list[list[dict]]]:
    """Layer 0's inputs per batch, and the keyword arguments each layer receives per batch ([layer][batch]).

    Every decoder layer's forward is replaced for one pass by a recorder that passes the hidden states
    through unchanged, so the model builds each layer's real arguments (a layer type's own rotary table and
    mask) at the cost of the embeddings; the pass stops after the last layer, before the head.
    """
    layers = decoder_layers(model, spec)
    first: list[LayerInput] = []
    per_layer: list[list[dict]] = [[] for _ in layers]

    def recorder(idx: int):
        def forward(*args, **kwargs):
            hidden = args[0] if args else kwargs.pop("hidden_states")
            per_layer[idx].append(kwargs)
            if idx == 0:
                first.append((hidden, kwargs))
            if idx == len(layers) - 1:
                raise _Captured
            return hidden
        return forward

    device = model.get_input_embeddings().weight.device
    for idx, layer in enumerate(layers):
        layer.forward = recorder(idx)
    try:
        for ids in batches:
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        for layer in layers:
            del layer.forward
    if any(len(k) != len(batches) for k in per_layer):
        raise FlapError("the model did not call each decoder layer once per forward; this architecture is not "
                        "supported by the layer walk")
    return first, per_layer


def layer_output(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def forward_all(layer: nn.Module, inputs: list[LayerInput], keep: bool = True) -> None:
    """Run every batch through one layer; with keep, the outputs replace the inputs in place."""
    for i, (hidden, kwargs) in enumerate(inputs):
        out = layer_output(layer(hidden, **kwargs))
        if keep:
            inputs[i] = (out, kwargs)


@contextmanager
def record_inputs(modules: dict[str, nn.Module], sinks: dict[str, ChannelStats | Covariance]):
    """Feed the input of each module into its statistics sink while the block runs."""
    handles = []
    for name, module in modules.items():
        sink = sinks[name]
        handles.append(module.register_forward_pre_hook(lambda m, args, sink=sink: sink.update(args[0])))
    try:
        yield sinks
    finally:
        for h in handles:
            h.remove()


def output_projections(layer: nn.Module, spec: ArchSpec) -> dict[str, nn.Linear]:
    return {"attn": output_proj(layer, spec, "attn"), "mlp": output_proj(layer, spec, "mlp")}


def layer_stats(layer: nn.Module, spec: ArchSpec, inputs: list[LayerInput], keep: bool, layer_idx: int) -> LayerStats:
    """Statistics of the inputs of o_proj and down_proj over all batches (one forward of the layer)."""
    proj = output_projections(layer, spec)
    sinks = {k: ChannelStats(m.in_features) for k, m in proj.items()}
    with record_inputs(proj, sinks):
        forward_all(layer, inputs, keep=keep)
    stats = LayerStats(sinks["attn"], sinks["mlp"])
    stats.attn.all_reduce_()
    stats.mlp.all_reduce_()
    if not (stats.attn.is_finite() and stats.mlp.is_finite()):
        raise FlapError(f"NaN or inf in the calibration activations of layer {layer_idx}; the model overflows on this "
                        "data in its dtype: load it in float32 (or bfloat16 instead of float16), or check the weights")
    return stats


@runtime_checkable
class LayerProvider(Protocol):
    """How every pass reaches the decoder layers: in memory (InMemoryLayers) or streamed from disk
    (offload.OffloadedLayers)."""

    def __len__(self) -> int: ...

    def open(self, idx: int) -> AbstractContextManager[nn.Module]:
        """The layer, with its weights loaded, for the duration of the block."""

    def commit(self, idx: int, layer: nn.Module) -> None:
        """The layer is final (pruned): keep it (in memory) or write it out (offloaded)."""

    def info(self) -> dict | None:
        """What the report should say about the provider (None: nothing)."""

    def open_head(self) -> AbstractContextManager[nn.Module]:
        """The model with its final norm and vocabulary projection loaded, for the duration of the block."""


class InMemoryLayers:
    """The decoder layers of a model held in memory."""

    scratch = None  # no folder for spilled activations: the model is in memory, so are they

    def __init__(self, model: nn.Module, spec: ArchSpec):
        self.model = model
        self.modules = decoder_layers(model, spec)

    def __len__(self) -> int:
        return len(self.modules)

    @contextmanager
    def open(self, idx: int):
        yield self.modules[idx]

    def commit(self, idx: int, layer: nn.Module) -> None:
        """The layer is final (pruned); nothing to do in memory."""

    def info(self) -> dict | None:
        return None

    @contextmanager
    def open_head(self):
        yield self.model


def walk(model: nn.Module, spec: ArchSpec, batches: list[torch.Tensor],
         visit: Callable[[int, nn.Module, list[LayerInput]], nn.Module | None],
         progress: bool = False, desc: str = "layers", layers: LayerProvider | None = None) -> None:
    """Drive the layer-by-layer walk: for each layer, `visit` does its work on the layer's inputs
    and returns None once it has already propagated them, or the module to propagate them with."""
    inputs, layer_kwargs = capture_inputs(model, spec, batches)
    layers = layers if layers is not None else InMemoryLayers(model, spec)
    for idx in tqdm(range(len(layers)), desc=desc, disable=not progress, unit="layer"):
        inputs[:] = [(hidden, kwargs) for (hidden, _), kwargs in zip(inputs, layer_kwargs[idx])]
        with layers.open(idx) as layer:
            runner = visit(idx, layer, inputs)
            if runner is not None:
                forward_all(runner, inputs, keep=True)


def collect_statistics(model: nn.Module, spec: ArchSpec, batches: list[torch.Tensor],
                       progress: bool = False, layers: LayerProvider | None = None,
                       on_layer: Callable[[int, nn.Module, LayerStats], None] | None = None) -> list[LayerStats]:
    """Statistics of every layer on the dense model, one forward pass over the calibration data;
    `on_layer` sees each layer with its statistics while the layer is loaded."""
    out: list[LayerStats] = []

    def visit(idx, layer, inputs):
        out.append(layer_stats(layer, spec, inputs, keep=True, layer_idx=idx))
        if on_layer is not None:
            on_layer(idx, layer, out[-1])
        return None

    walk(model, spec, batches, visit, progress, desc="calibration", layers=layers)
    return out
