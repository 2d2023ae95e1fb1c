"""GGUF export for llama.cpp. A model whose layers all keep the same widths (depth, a uniform plan, the dense model)
is written in its family's own architecture (gguf_native.py); a plan with each layer's own widths as the `deci`
architecture (per-layer head, KV-head and FFN arrays, optional attn_output / ffn_down biases), for the families
deci computes (LLaMA, Mistral, Qwen2).

    flap_llm.save_gguf(model, "model.gguf", tokenizer, dtype="f16")

The file computes what the pruned model computes: see layout.py for the layers deci cannot run as they
are. Anything that cannot be expressed exactly is refused before a byte is written.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..model.arch import (ArchSpec, applied_window, architecture_of, attention_parts, decoder_layers, dims_of,
    get_module, mlp_parts, spec_of)
from ..atomic import atomic_file, check_writable_parent, temp_sibling
from ..errors import FlapError
from .gguf_vocab import copy_gguf_vocab, write_hf_vocab
from .gguf_native import NATIVE, Native, _np, check_activation, native_refusal, rope_interleave, rope_tables
from .gguf_native import layer_tensors as native_layer_tensors, uniform_widths, write_native_keys
from .layout import DeciLayer, deci_layout

GGUF_DTYPES = ("f32", "f16", "bf16", "q8_0")  # what this exporter writes itself
# llama.cpp's quantization types that llama-quantize makes from our f16 file (its names; any case on input)
QUANT_TYPES = ("Q6_K", "Q5_K_M", "Q5_K_S", "Q5_0", "Q4_K_M", "Q4_K_S", "Q4_0", "Q3_K_M", "Q2_K")
ARCH = "deci"
_Q8_BLOCK = 32


def _rope_parameters(config) -> dict:
    """The rotary settings of the global layers (every layer but Gemma 3's local ones)."""
    return rope_tables(config)["global"]


def llama3_rope_factors(params: dict, head_dim: int) -> np.ndarray:
    """Llama 3.1's frequency divisors per rotary pair (what `rope_freqs.weight` holds)."""
    base, factor = float(params["rope_theta"]), float(params["factor"])
    low, high = float(params["low_freq_factor"]), float(params["high_freq_factor"])
    old_ctx = float(params["original_max_position_embeddings"])
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * base ** (i / head_dim)
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def gguf_type(name: str) -> str:
    """A GGUF weight type as given by a user (any case) in its canonical spelling: ours in lower case (f32, f16,
    bf16, q8_0; Q8_0 is ours too), llama-quantize's in upper case (Q4_K_M, ...)."""
    if not isinstance(name, str):
        raise FlapError(f"GGUF type must be a string such as f16 or Q4_K_M, got {name!r}")
    if name.lower() in GGUF_DTYPES:
        return name.lower()
    if name.upper() in QUANT_TYPES:
        return name.upper()
    raise FlapError(f"unknown GGUF type {name!r}; choose one of: {', '.join(GGUF_DTYPES + QUANT_TYPES)} (any case)")


def needs_quantize(dtype: str) -> bool:
    """Whether llama.cpp's llama-quantize makes this type (from an f16 file we write first)."""
    return gguf_type(dtype) in QUANT_TYPES


def gguf_alignment(dtype: str) -> int | None:
    """The MLP width multiple a type needs for ffn_down's rows (its input width: the kept channels) to take it
    whole: 256 for the k-quants' super-blocks, 32 for the 32-value blocks of Q4_0, Q5_0, q8_0, and for f16;
    None for f32 and bf16. llama-quantize gives a row that is not a multiple another, wider type."""
    t = gguf_type(dtype)
    if "_K" in t:
        return 256
    return None if t in ("f32", "bf16") else 32


def usable_type(name: str) -> str:
    """`gguf_type`, and for a type llama-quantize makes, a check (before any work) that llama.cpp's tools are
    installed."""
    dtype = gguf_type(name)
    if needs_quantize(dtype):
        from .llamacpp import binary
        binary("llama-quantize")
    return dtype


def check_exportable(model: nn.Module, dtype: str) -> None:
    """Everything that makes a GGUF inexact is refused here, before anything is written; a type llama-quantize
    makes needs llama.cpp's tools installed."""
    usable_type(dtype)
    if getattr(model.config, "flap_mode", None) == "mask":
        raise FlapError("this model was pruned with mode 'mask' (zeroed, full shapes); prune with mode 'prune' "
                        "to export a smaller GGUF")
    gguf_target(model)


def gguf_target(model: nn.Module) -> Native | None:
    """The llama.cpp architecture the model is written in: its family's own (gguf_native.NATIVE) when every layer
    keeps the same widths and that architecture computes it exactly, else `deci` (None; LLaMA, Mistral and
    Qwen2 only). Raises FlapError with the reason when neither can."""
    arch, spec = architecture_of(model), spec_of(model)
    why = native_refusal(model, dims_of(model).head_dim)
    if why is None:
        check_activation(model, NATIVE[arch])
        return NATIVE[arch]
    if spec.gguf_unsupported:
        raise FlapError(f"cannot export {arch} to GGUF: {why}, and {spec.gguf_unsupported}; use the flap "
                        "checkpoint (load_pruned / trust_remote_code) instead")
    window = applied_window(model)
    if window is not None:
        raise FlapError(f"this model attends through a sliding window of {window} tokens, which llama.cpp's deci "
                        "architecture does not apply; use the flap checkpoint (or --export hf-uniform) instead")
    rope = _rope_parameters(model.config)
    if rope["rope_type"] not in ("default", "linear", "llama3"):
        raise FlapError(f"rope scaling {rope['rope_type']!r} is not supported in GGUF export (default, linear and "
                        "llama3 are); use the flap checkpoint instead")
    act = getattr(model.config, "hidden_act", "silu")
    if act != "silu":
        raise FlapError(f"GGUF export needs a SiLU-gated MLP, this model uses {act!r}")
    return None


def check_plan_exportable(model: nn.Module, config) -> None:
    """Before pruning: a family that only its own llama.cpp architecture holds (no `deci`) needs a plan with the
    same widths in every layer and no compensation bias (--method depth, or a uniform structure with
    compensation none)."""
    spec = spec_of(model)
    if spec.gguf_unsupported and not (config.uniform and config.effective_compensation == "none"):
        raise FlapError(f"{architecture_of(model)} goes to llama.cpp only in its own architecture, which needs the "
                        f"same widths in every layer and no compensation bias, and {config.label} does not give "
                        f"that ({spec.gguf_unsupported}); prune with --method depth (or --structure UL-UM "
                        "--compensation none), or drop --gguf")


def layer_widths(model: nn.Module, spec: ArchSpec, head_dim: int) -> list[tuple[int, int, int]]:
    """Per layer (query heads, KV heads, MLP channels), read from the modules themselves."""
    widths = []
    for layer in decoder_layers(model, spec):
        q, k, _, _ = attention_parts(layer, spec)
        gate, _, _ = mlp_parts(layer, spec)
        widths.append((q.out_features // head_dim, k.out_features // head_dim, gate.out_features))
    return widths


class _Tensors:
    """Collects named tensors in GGUF encoding: 1-D in f32; 2-D in the chosen dtype (q8_0 only where the
    row width is a multiple of its 32-value block, else f16, as llama-quantize does)."""

    def __init__(self, dtype: str):
        self.dtype = dtype
        self.items: list[tuple[str, np.ndarray, object]] = []
        self.fallbacks = 0

    def add(self, name: str, w: np.ndarray) -> None:
        import gguf

        w = np.ascontiguousarray(w, dtype=np.float32)
        if w.ndim == 1 or self.dtype == "f32":
            self.items.append((name, w, None))
        elif self.dtype == "q8_0" and w.shape[-1] % _Q8_BLOCK == 0:
            q = gguf.GGMLQuantizationType.Q8_0
            self.items.append((name, gguf.quants.quantize(w, q), q))
        elif self.dtype == "bf16":
            q = gguf.GGMLQuantizationType.BF16
            self.items.append((name, gguf.quants.quantize(w, q), q))
        else:
            self.fallbacks += self.dtype == "q8_0"
            self.items.append((name, w.astype(np.float16), None))


def _layer_tensors(out: _Tensors, i: int, layer: nn.Module, spec: ArchSpec, lay: DeciLayer, head_dim: int,
                   hidden: int, fold: torch.Tensor | None) -> None:
    q, k, v, o = attention_parts(layer, spec)
    gate, up, down = mlp_parts(layer, spec)
    p = f"blk.{i}."
    if lay.n_head and not lay.fold_attn_bias:  # deci computes attention here (a real or an all-zero head)
        out.add(p + "attn_norm.weight", _np(getattr(layer, spec.attn_norm).weight))
        if lay.pad_head:
            zeros = np.zeros((head_dim, hidden), np.float32)
            for name in ("attn_q", "attn_k", "attn_v"):
                out.add(p + name + ".weight", zeros)
            out.add(p + "attn_output.weight", np.zeros((hidden, head_dim), np.float32))
        else:
            n_head, n_kv = q.out_features // head_dim, k.out_features // head_dim
            out.add(p + "attn_q.weight", rope_interleave(_np(q.weight), n_head, head_dim))
            out.add(p + "attn_k.weight", rope_interleave(_np(k.weight), n_kv, head_dim))
            out.add(p + "attn_v.weight", _np(v.weight))
            out.add(p + "attn_output.weight", _np(o.weight))
            for name, lin, heads in (("attn_q", q, n_head), ("attn_k", k, n_kv), ("attn_v", v, None)):
                if lin.bias is not None:
                    b = _np(lin.bias)
                    out.add(p + name + ".bias", b if heads is None else rope_interleave(b, heads, head_dim))
        if o.bias is not None:
            out.add(p + "attn_output.bias", _np(o.bias))
    out.add(p + "ffn_norm.weight", _np(getattr(layer, spec.mlp_norm).weight))
    if lay.pad_ff:
        out.add(p + "ffn_gate.weight", np.zeros((1, hidden), np.float32))
        out.add(p + "ffn_up.weight", np.zeros((1, hidden), np.float32))
        out.add(p + "ffn_down.weight", np.zeros((hidden, 1), np.float32))
    else:
        out.add(p + "ffn_gate.weight", _np(gate.weight))
        out.add(p + "ffn_up.weight", _np(up.weight))
        out.add(p + "ffn_down.weight", _np(down.weight))
        for name, lin in (("ffn_gate", gate), ("ffn_up", up)):
            if lin.bias is not None:
                out.add(p + name + ".bias", _np(lin.bias))
    bias = down.bias.detach().to("cpu", torch.float64) if down.bias is not None else None
    if fold is not None:
        bias = fold if bias is None else bias + fold
    if bias is not None:
        out.add(p + "ffn_down.bias", bias.numpy())


def _folds(model: nn.Module, spec: ArchSpec, layout: list[DeciLayer]) -> list[torch.Tensor | None]:
    """For each layer, the constants of later pass-through layers that its ffn_down.bias must add."""
    folds: list[torch.Tensor | None] = [None] * len(layout)
    for i, (layer, lay) in enumerate(zip(decoder_layers(model, spec), layout)):
        o = attention_parts(layer, spec)[3]
        if lay.fold_attn_bias and o.bias is not None:
            b = o.bias.detach().to("cpu", torch.float64)
            folds[i - 1] = b if folds[i - 1] is None else folds[i - 1] + b
    return folds


def _source_gguf(model: nn.Module) -> Path | None:
    src = getattr(model.config, "flap_source", None)
    return Path(src) if src and str(src).endswith(".gguf") and Path(src).is_file() else None


def check_gguf_destination(path: Path, overwrite: bool) -> None:
    """A .gguf file name we may write: not a folder, not an existing file unless overwriting, a writable parent."""
    if path.suffix != ".gguf":
        raise FlapError(f"{path}: a GGUF file name must end in .gguf")
    if path.is_dir():
        raise FlapError(f"{path} is a folder; give a file name ending in .gguf")
    if path.exists() and not overwrite:
        raise FlapError(f"{path} exists; choose another name or pass overwrite=True (--overwrite)")
    check_writable_parent(path)


def _write_header(writer, model: nn.Module, layout: list[DeciLayer] | None, head_dim: int, dtype: str, n_vocab: int,
                  rope: dict, native: Native | None) -> None:
    import gguf

    c = model.config
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(Path(str(getattr(c, "flap_source", None) or c.name_or_path or "model")).stem + "-flap")
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(n_vocab)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(int(getattr(c, "max_position_embeddings", 4096)))
    writer.add_embedding_length(c.hidden_size)
    if native:  # one width for every layer
        n_head, n_kv, n_ff = uniform_widths(model, spec_of(model), head_dim)
    else:  # deci: per-layer arrays
        n_head, n_kv, n_ff = ([lay.n_head for lay in layout], [lay.n_head_kv for lay in layout],
                              [lay.n_ff for lay in layout])
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_key_length(head_dim)  # explicit: never derived from layer 0's head count
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_layer_norm_rms_eps(float(c.rms_norm_eps))
    if native:
        write_native_keys(writer, model, native)


def save_gguf(model: nn.Module, path: str | os.PathLike, tokenizer=None, dtype: str = "f16", *,
              overwrite: bool = False, progress: bool = False) -> Path:
    """Write a pruned (or dense) model as a GGUF file that llama.cpp runs: in the family's own architecture when
    every layer keeps the same widths, else as `deci` with each layer's own widths.

    dtype: "f32", "f16" (default), "bf16" or "q8_0" for the 2-D weights (norms and biases stay f32), written
        here; or one of llama.cpp's quantization types (QUANT_TYPES: "Q4_K_M", "Q6_K", ...; any case), which
        llama.cpp's llama-quantize makes from an f16 file written first (needs the `llama` extra). Prune with
        `align=gguf_alignment(dtype)` so that every ffn_down row takes the type.
    tokenizer: the model's Hugging Face tokenizer; when the model came from a .gguf file, that file's
        tokenizer is carried over instead. The file appears under its name only once complete.
    """
    dtype = gguf_type(dtype)
    check_exportable(model, dtype)
    path = Path(path)
    check_gguf_destination(path, overwrite)
    if needs_quantize(dtype):
        return _quantized(model, path, tokenizer, dtype, progress)
    return _write(model, path, tokenizer, dtype, progress)


def _write(model: nn.Module, path: Path, tokenizer, dtype: str, progress: bool, what: str = "the GGUF file",
           shown: Path | None = None) -> Path:
    """The GGUF file itself (save_gguf has checked the model and the destination); a full disk is reported as
    writing `what` to `shown` (default: `path`)."""
    import gguf

    source = _source_gguf(model)
    if source is not None and source.resolve() == path.resolve():
        raise FlapError(f"refusing to overwrite the source model {path}; choose another output name")
    if source is None and tokenizer is None:
        raise FlapError("GGUF export needs the model's tokenizer (or a model loaded from a .gguf file)")
    spec, dims = spec_of(model), dims_of(model)
    hd, hidden = dims.head_dim, dims.hidden
    native = gguf_target(model)
    layout = None if native else deci_layout(layer_widths(model, spec, hd))
    embed = get_module(model, spec.embed).weight
    n_vocab = embed.shape[0]

    tensors = _Tensors(dtype)
    tensors.add("token_embd.weight", _np(embed))
    folds = None if native else _folds(model, spec, layout)
    layers = decoder_layers(model, spec)
    for i in tqdm(range(len(layers)), desc="gguf tensors", disable=not progress, unit="layer"):
        if native:
            native_layer_tensors(tensors, i, layers[i], spec, native, hd)
        else:
            _layer_tensors(tensors, i, layers[i], spec, layout[i], hd, hidden, folds[i])
    shift = np.float32(native.norm_shift if native else 0.0)  # Gemma 3's norms scale by (1 + weight)
    tensors.add("output_norm.weight", _np(get_module(model, spec.final_norm).weight) + shift)
    lm_head = get_module(model, spec.lm_head).weight
    if lm_head.data_ptr() != embed.data_ptr():
        tensors.add("output.weight", _np(lm_head))
    rope = _rope_parameters(model.config)
    if rope["rope_type"] == "llama3":
        tensors.add("rope_freqs.weight", llama3_rope_factors(rope, hd))

    needed = sum(data.nbytes for _, data, _ in tensors.items)  # the tensors; the header and vocabulary are small
    with atomic_file(path, what, needed, shown=shown) as tmp:
        writer = gguf.GGUFWriter(tmp, native.arch if native else ARCH)
        _write_header(writer, model, layout, hd, dtype, n_vocab, rope, native)
        if source is not None:
            copy_gguf_vocab(source, writer, n_vocab)
        else:
            write_hf_vocab(tokenizer, writer, n_vocab)
        for name, data, raw in tensors.items:
            writer.add_tensor(name, data, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=progress)
        writer.close()
    if tensors.fallbacks:
        warnings.warn(f"{tensors.fallbacks} weight matrices were written in f16, not q8_0: their rows are not "
                      "multiples of 32 values; prune with align=32 (--align 32) to quantize them all", stacklevel=2)
    return path


def _quantized(model: nn.Module, path: Path, tokenizer, qtype: str, progress: bool) -> Path:
    """An f16 GGUF written beside `path` (removed afterwards), then llama-quantize into `path`, atomically."""
    from .llamacpp import quantize
    # named as a temporary of `path` (removed by the next run that writes it, if this one is killed)
    f16 = Path(f"{temp_sibling(path)}.f16.gguf")
    try:
        _write(model, f16, tokenizer, "f16", progress, what="the f16 GGUF that llama-quantize reads", shown=path)
        with atomic_file(path, f"the {qtype} GGUF file", f16.stat().st_size) as tmp:
            quantize(f16, tmp, qtype)
    finally:
        f16.unlink(missing_ok=True)
    return path


def export_gguf(model: str | None, out: str | os.PathLike, dtype: str = "f16", *, overwrite: bool = False,
                progress: bool = True) -> tuple[str, Path]:
    """Load `model` (a pruned checkpoint, a local folder, a .gguf file; None: the embedded SmolLM2) and write it
    as the GGUF file `out`; everything that can be refused is refused before loading. Returns (the model's
    path, the file written)."""
    from ..model.models import load_model
    out = Path(out).expanduser()
    if model and Path(model).expanduser().resolve() == out.resolve():
        raise FlapError(f"refusing to overwrite the source model {out}; choose another output name")
    check_gguf_destination(out, overwrite)  # before loading; save_gguf checks again, cheaply
    dtype = usable_type(dtype)
    net, tokenizer, path = load_model(model, "float32", "cpu", progress)
    return path, save_gguf(net, out, tokenizer, dtype, overwrite=overwrite, progress=progress)
