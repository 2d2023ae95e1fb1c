"""GGUF in a family's own llama.cpp architecture (llama, qwen2, qwen3, gemma3, phi3, granite), for models whose
layers all keep the same widths: depth-pruned models, uniform plans and the dense model. llama.cpp's native
architectures build every layer's tensors from one head count and one FFN width, so a plan with per-layer widths
goes to `deci` (LLaMA, Mistral, Qwen2) or is refused.

What each family needs beyond LLaMA's tensor names (checked against llama.cpp's loaders and graphs):
- rope: llama and granite rotate interleaved pairs (q/k rows permuted, as for deci); the others rotate halves
  (rows as transformers has them);
- qwen3 and gemma3 have per-head q/k norms; gemma3 also post-attention and post-MLP norms, norms that scale by
  (1 + weight) (written with the 1 added), a per-layer sliding-window array (the kept layers' own pattern) and
  the local layers' rotary base;
- phi3 keeps its fused q/k/v (attn_qkv) and gate/up (ffn_up, 2 x n_ff rows) matrices;
- granite carries its embedding, residual, attention and logit multipliers as keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..errors import FlapError
from ..model.arch import (ArchSpec, applied_window, architecture_of, decoder_layers, input_projs, input_widths,
    output_proj, spec_of)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).numpy()


def rope_interleave(w: np.ndarray, n_heads: int, head_dim: int) -> np.ndarray:
    """Reorder q/k rows (or biases) from transformers' rotate-half layout to llama.cpp's interleaved pairs,
    per head: rows [0..d/2) and [d/2..d) of a head become pairs (0, d/2), (1, d/2+1), ..."""
    shape = w.shape
    return w.reshape(n_heads, 2, head_dim // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


@dataclass(frozen=True)
class Native:
    arch: str  # llama.cpp's architecture name
    interleave: bool  # rope over interleaved pairs (LLaMA's NORM rope): q/k rows are permuted
    biases: frozenset[str]  # the optional bias tensors its loader reads
    qk_norm: bool = False
    post_norms: bool = False  # gemma3: post-attention and post-MLP norms
    norm_shift: float = 0.0  # gemma3's norms scale by (1 + weight)
    square_attn: bool = False  # its loader makes attn_output n_embd x n_embd (heads x head_dim must be the width)
    swa: bool = False  # reads a per-layer sliding-window pattern
    rope_types: tuple[str, ...] = ("default", "linear")


_LLAMA_BIASES = frozenset({"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"})
NATIVE: dict[str, Native] = {
    "LlamaForCausalLM": Native("llama", True, _LLAMA_BIASES, rope_types=("default", "linear", "llama3")),
    "MistralForCausalLM": Native("llama", True, _LLAMA_BIASES),
    "Qwen2ForCausalLM": Native("qwen2", False, frozenset({"attn_q", "attn_k", "attn_v"}), square_attn=True),
    "Qwen3ForCausalLM": Native("qwen3", False, frozenset({"attn_q", "attn_k", "attn_v"}), qk_norm=True),
    "Gemma3ForCausalLM": Native("gemma3", False, frozenset(), qk_norm=True, post_norms=True, norm_shift=1.0,
                                swa=True),
    "Phi3ForCausalLM": Native("phi3", False, frozenset({"attn_qkv"}), square_attn=True),
    "GraniteForCausalLM": Native("granite", True, frozenset({"attn_q", "attn_k", "attn_v", "attn_output", "ffn_down"})),
}


def uniform_widths(model: nn.Module, spec: ArchSpec, head_dim: int) -> tuple[int, int, int] | None:
    """(query heads, KV heads, MLP channels) shared by every layer, or None when the layers differ or one is
    empty."""
    widths = {input_widths(layer, spec, head_dim) for layer in decoder_layers(model, spec)}
    if len(widths) != 1:
        return None
    (w,) = widths
    return w if all(w) else None


def _present_biases(model: nn.Module, spec: ArchSpec) -> set[str]:
    names = {}
    layer = decoder_layers(model, spec)[0]
    if spec.qkv:
        names["attn_qkv"] = input_projs(layer, spec, "attn")[0]
    else:
        names.update(zip(("attn_q", "attn_k", "attn_v"), input_projs(layer, spec, "attn")))
    if not spec.gate_up:
        names.update(zip(("ffn_gate", "ffn_up"), input_projs(layer, spec, "mlp")))
    names["attn_output"], names["ffn_down"] = output_proj(layer, spec, "attn"), output_proj(layer, spec, "mlp")
    return {n for n, lin in names.items() if lin.bias is not None}


def native_refusal(model: nn.Module, head_dim: int) -> str | None:
    """Why the family's own llama.cpp architecture cannot hold this model exactly (None: it can)."""
    arch = architecture_of(model)
    native, spec, c = NATIVE[arch], spec_of(model), model.config
    widths = uniform_widths(model, spec, head_dim)
    if widths is None:
        return (f"llama.cpp's {native.arch} architecture needs the same widths in every layer, and this plan "
                "gives each layer its own (prune with --method depth or a uniform structure)")
    extra = _present_biases(model, spec) - native.biases
    if extra:
        return (f"llama.cpp's {native.arch} architecture has no {', '.join(sorted(extra))} bias (the compensation "
                "adds it; prune with compensation none, or --method depth)")
    if native.square_attn and widths[0] * head_dim != c.hidden_size:
        return (f"llama.cpp's {native.arch} architecture needs query heads x head size = the hidden size "
                f"({c.hidden_size}); this model keeps {widths[0]} heads of {head_dim}")
    if applied_window(model) is not None and not native.swa:
        return f"llama.cpp's {native.arch} architecture does not apply this model's sliding window"
    if native.swa:
        if getattr(c, "attn_logit_softcapping", None) is not None:
            return "llama.cpp's gemma3 has no attention logit soft-capping"
        if getattr(c, "query_pre_attn_scalar", head_dim) != head_dim:
            return (f"llama.cpp's gemma3 scales attention by 1/sqrt(head size) at this size, but this model by "
                    f"1/sqrt({c.query_pre_attn_scalar})")
    if getattr(c, "partial_rotary_factor", 1.0) not in (None, 1.0):
        return "partial rotary embeddings are not written to GGUF"
    for params in rope_tables(c).values():
        if params["rope_type"] not in native.rope_types:
            return f"rope scaling {params['rope_type']!r} is not written to llama.cpp's {native.arch}"
    return None


def rope_tables(config) -> dict:
    """{"global": params, "local": params or absent}: Gemma 3 keeps one rotary table per layer type."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    if "full_attention" in params:
        out = {"global": dict(params["full_attention"])}
        if "sliding_attention" in params:
            out["local"] = dict(params["sliding_attention"])
    else:
        out = {"global": params}
    for p in out.values():
        p.setdefault("rope_theta", getattr(config, "rope_theta", None) or 10000.0)
        p["rope_type"] = p.get("rope_type") or p.get("type") or "default"
    if "local" not in out and getattr(config, "rope_local_base_freq", None):
        out["local"] = {"rope_theta": config.rope_local_base_freq, "rope_type": "default"}
    return out


def write_native_keys(writer, model: nn.Module, native: Native) -> None:
    """The keys a family's own architecture reads beyond LLaMA's shapes, rope and norm (gguf_file writes those):
    Gemma 3's per-layer sliding pattern, local rotary base and soft-capping, Granite's multipliers."""
    c = model.config
    if native.swa:
        types = list(getattr(c, "layer_types", None) or [])
        window = getattr(c, "sliding_window", None)
        if window and "sliding_attention" in types:
            rope = rope_tables(c)
            writer.add_sliding_window(int(window))
            writer.add_sliding_window_pattern([t == "sliding_attention" for t in types])
            writer.add_rope_freq_base_swa(float(rope.get("local", rope["global"])["rope_theta"]))
        if getattr(c, "final_logit_softcapping", None):
            writer.add_final_logit_softcapping(float(c.final_logit_softcapping))
    if native.arch == "granite":
        writer.add_embedding_scale(float(c.embedding_multiplier))
        writer.add_residual_scale(float(c.residual_multiplier))
        writer.add_attention_scale(float(c.attention_multiplier))
        writer.add_logit_scale(float(c.logits_scaling))


def layer_tensors(out, i: int, layer: nn.Module, spec: ArchSpec, native: Native, head_dim: int) -> None:
    """One decoder layer's tensors under llama.cpp's names (`out` is gguf_file's tensor collector)."""
    p = f"blk.{i}."
    n_head, n_kv, _ = input_widths(layer, spec, head_dim)
    attn = getattr(layer, spec.attn)

    def norm(name: str, module: nn.Module) -> None:
        out.add(p + name, _np(module.weight) + np.float32(native.norm_shift))

    def rows(w: torch.Tensor, heads: int | None) -> np.ndarray:
        w = _np(w)
        return rope_interleave(w, heads, head_dim) if native.interleave and heads else w

    norm("attn_norm.weight", getattr(layer, spec.attn_norm))
    if spec.qkv:
        qkv = input_projs(layer, spec, "attn")[0]
        out.add(p + "attn_qkv.weight", _np(qkv.weight))
        if qkv.bias is not None:
            out.add(p + "attn_qkv.bias", _np(qkv.bias))
    else:
        for name, lin, heads in zip(("attn_q", "attn_k", "attn_v"), input_projs(layer, spec, "attn"),
                                    (n_head, n_kv, None)):
            out.add(p + name + ".weight", rows(lin.weight, heads))
            if lin.bias is not None:
                out.add(p + name + ".bias", rows(lin.bias, heads))
    o = output_proj(layer, spec, "attn")
    out.add(p + "attn_output.weight", _np(o.weight))
    if o.bias is not None:
        out.add(p + "attn_output.bias", _np(o.bias))
    if native.qk_norm:
        norm("attn_q_norm.weight", attn.q_norm)
        norm("attn_k_norm.weight", attn.k_norm)
    if native.post_norms:
        norm("post_attention_norm.weight", layer.post_attention_layernorm)
        norm("post_ffw_norm.weight", layer.post_feedforward_layernorm)
    norm("ffn_norm.weight", getattr(layer, spec.mlp_norm))
    if spec.gate_up:  # phi3: gate's rows then up's, as llama.cpp's fused SwiGLU reads them
        out.add(p + "ffn_up.weight", _np(input_projs(layer, spec, "mlp")[0].weight))
    else:
        for name, lin in zip(("ffn_gate", "ffn_up"), input_projs(layer, spec, "mlp")):
            out.add(p + name + ".weight", _np(lin.weight))
            if lin.bias is not None:
                out.add(p + name + ".bias", _np(lin.bias))
    down = output_proj(layer, spec, "mlp")
    out.add(p + "ffn_down.weight", _np(down.weight))
    if down.bias is not None:
        out.add(p + "ffn_down.bias", _np(down.bias))





def check_activation(model: nn.Module, native: Native) -> None:
    act = getattr(model.config, "hidden_activation", None) or getattr(model.config, "hidden_act", "silu")
    want = "gelu_pytorch_tanh" if native.arch == "gemma3" else "silu"
    if act != want:
        raise FlapError(f"llama.cpp's {native.arch} computes a {want} MLP, this model uses {act!r}")
