"""Everything model-family-specific, in one table keyed by the Hugging Face architecture name.

A new family is one entry here plus a tiny-config test.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import FlapError


@dataclass(frozen=True)
class ArchSpec:
    """How one model family is laid out. Module paths are relative to the model (`layers`, `embed`,
    `rotary`, `final_norm`, `lm_head`), to a decoder layer (`attn`, `mlp`, norms) or to its attention/MLP
    block (the projections)."""

    layers: str = "model.layers"  # the nn.ModuleList of decoder layers
    attn: str = "self_attn"
    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    o: str = "o_proj"
    mlp: str = "mlp"
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"
    # Fused projections: one Linear whose rows are q's heads, then k's, then v's (qkv), or gate's channels,
    # then up's (gate_up). When set, q/k/v (gate/up) above are not separate modules.
    qkv: str | None = None
    gate_up: str | None = None
    # The attention reads its head counts from its config at run time: a pruned layer gets its own copy.
    attn_reads_config: bool = False
    # The config flag that switches config.sliding_window on (None: on whenever it is set, as in Mistral).
    # Exports that cannot apply a window (GGUF's deci, a biased LLaMA) refuse a model where it applies.
    window_switch: str | None = "use_sliding_window"
    embed: str = "model.embed_tokens"
    rotary: str | None = "model.rotary_emb"
    attn_norm: str = "input_layernorm"  # the norm feeding the attention (inside a decoder layer)
    mlp_norm: str = "post_attention_layernorm"  # the norm feeding the MLP
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    # format="hf-uniform": the stock class that holds a uniformly pruned model (None: the family's own) and the
    # config keys that give its o_proj / down_proj a bias (None: the stock model cannot hold that bias).
    uniform_class: str | None = None
    uniform_bias_keys: tuple[str | None, str | None] = ("attention_bias", "mlp_bias")
    # Why llama.cpp's `deci` architecture cannot compute this family exactly (None: it can).
    gguf_unsupported: str | None = None

    def modules(self) -> dict:
        """The names a pruned checkpoint's modeling file needs to rebuild the layers (config.flap_modules)."""
        return {"layers": self.layers, "attn": self.attn, "q": self.q, "k": self.k, "v": self.v, "o": self.o,
                "mlp": self.mlp, "gate": self.gate, "up": self.up, "down": self.down, "qkv": self.qkv,
                "gate_up": self.gate_up, "attn_reads_config": self.attn_reads_config}


ARCHITECTURES: dict[str, ArchSpec] = {
    "LlamaForCausalLM": ArchSpec(),
    "MistralForCausalLM": ArchSpec(uniform_class="LlamaForCausalLM", window_switch=None),
    "Qwen2ForCausalLM": ArchSpec(uniform_class="LlamaForCausalLM"),
    "Qwen3ForCausalLM": ArchSpec(uniform_bias_keys=("attention_bias", None),
                                 gguf_unsupported="llama.cpp's deci architecture has no per-head q/k norms (Qwen3)"),
    # Gemma 3 (text): q/k norms, post-attention / post-feedforward norms, per-layer-type rotary tables and masks
    "Gemma3ForCausalLM": ArchSpec(mlp_norm="pre_feedforward_layernorm", uniform_bias_keys=("attention_bias", None),
                                  gguf_unsupported="llama.cpp's deci architecture has no q/k norms or post-norms "
                                  "(Gemma 3)"),
    # Granite: LLaMA's layout with embedding, attention, residual and logit multipliers
    "GraniteForCausalLM": ArchSpec(gguf_unsupported="llama.cpp's deci architecture has no Granite multipliers"),
    # Phi-3: fused q/k/v and gate/up projections
    "Phi3ForCausalLM": ArchSpec(qkv="qkv_proj", gate_up="gate_up_proj", attn_reads_config=True,
                                uniform_bias_keys=(None, None),
                                gguf_unsupported="llama.cpp's deci architecture has no fused projections (Phi-3)"),
}


def architecture_of(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    names = list(getattr(config, "architectures", None) or [])
    names.append(type(model).__name__)
    for name in names:
        if name in ARCHITECTURES:
            return name
    # A pruned checkpoint loaded through its own modeling file keeps the base architecture here.
    base = getattr(config, "flap_base_architecture", None)
    if base in ARCHITECTURES:
        return base
    raise FlapError(
        f"unsupported architecture {type(model).__name__} (config says {names[:-1] or 'nothing'}); "
        f"supported: {', '.join(ARCHITECTURES)}"
    )


def spec_of(model: nn.Module) -> ArchSpec:
    return ARCHITECTURES[architecture_of(model)]


def get_module(root: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        root = getattr(root, part)
    return root


def decoder_layers(model: nn.Module, spec: ArchSpec) -> nn.ModuleList:
    return get_module(model, spec.layers)


@dataclass(frozen=True)
class Dims:
    """The dense model's shapes, read from its config (never hard-coded)."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden: int
    d_ff: int

    @property
    def group_size(self) -> int:
        return self.n_heads // self.n_kv_heads

    @property
    def group_weight(self) -> float:
        """Parameters of one KV group in units of one MLP channel (3*hidden parameters)."""
        return self.head_dim * (2 * self.group_size + 2) / 3


def applied_window(model: nn.Module) -> int | None:
    """The sliding window the model's attention really applies (shorter than its positions), else None."""
    c = model.config
    window = getattr(c, "sliding_window", None)
    switch = spec_of(model).window_switch
    if window is None or (switch is not None and not getattr(c, switch, False)):
        return None
    return window if window < getattr(c, "max_position_embeddings", 0) else None


def config_head_dim(config) -> int:
    """head_dim as the families define it: explicit in the config, or hidden_size / num_attention_heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def dims_of(model: nn.Module) -> Dims:
    c = model.config
    n_heads = c.num_attention_heads
    n_kv = getattr(c, "num_key_value_heads", None) or n_heads
    head_dim = config_head_dim(c)
    if n_heads % n_kv:
        raise FlapError(f"num_attention_heads {n_heads} is not a multiple of num_key_value_heads {n_kv}")
    return Dims(c.num_hidden_layers, n_heads, n_kv, head_dim, c.hidden_size, c.intermediate_size)


def attention_block(layer: nn.Module, spec: ArchSpec) -> nn.Module:
    return getattr(layer, spec.attn)


def mlp_block(layer: nn.Module, spec: ArchSpec) -> nn.Module:
    return getattr(layer, spec.mlp)


def output_proj(layer: nn.Module, spec: ArchSpec, module: str) -> nn.Linear:
    """o_proj (module "attn") or down_proj (module "mlp"): the projections whose inputs FLAP scores."""
    if module == "attn":
        return getattr(attention_block(layer, spec), spec.o)
    return getattr(mlp_block(layer, spec), spec.down)


def input_projs(layer: nn.Module, spec: ArchSpec, module: str) -> list[nn.Linear]:
    """The Linear modules that produce a block's scored channels: q, k, v (or the fused qkv) for "attn";
    gate, up (or the fused gate_up) for "mlp"."""
    if module == "attn":
        block, fused, names = attention_block(layer, spec), spec.qkv, (spec.q, spec.k, spec.v)
    else:
        block, fused, names = mlp_block(layer, spec), spec.gate_up, (spec.gate, spec.up)
    return [getattr(block, fused)] if fused else [getattr(block, n) for n in names]


def input_widths(layer: nn.Module, spec: ArchSpec, head_dim: int) -> tuple[int, int, int]:
    """(query heads, KV heads, MLP channels) a layer has now, read from its weights."""
    o, down = output_proj(layer, spec, "attn"), output_proj(layer, spec, "mlp")
    n_heads = o.in_features // head_dim
    n_kv = (sum(l.out_features for l in input_projs(layer, spec, "attn")) - n_heads * head_dim) // (2 * head_dim)
    return n_heads, n_kv, down.in_features


def projection_weights(layer: nn.Module, spec: ArchSpec, head_dim: int) -> dict[str, nn.Linear | torch.Tensor]:
    """q, k, v, gate, up (rows of the fused matrices where fused) and o, down of one layer, as weight tensors."""
    n_heads, n_kv, d_ff = input_widths(layer, spec, head_dim)
    out = {}
    attn_w = torch.cat([l.weight for l in input_projs(layer, spec, "attn")])
    out["q"], out["k"], out["v"] = attn_w.split([n_heads * head_dim, n_kv * head_dim, n_kv * head_dim])
    mlp_w = torch.cat([l.weight for l in input_projs(layer, spec, "mlp")])
    out["gate"], out["up"] = mlp_w.split([d_ff, d_ff])
    out["o"], out["down"] = output_proj(layer, spec, "attn").weight, output_proj(layer, spec, "mlp").weight
    return out


def attention_parts(layer: nn.Module, spec: ArchSpec) -> tuple[nn.Linear, nn.Linear, nn.Linear, nn.Linear]:
    """q, k, v, o of a family with separate projections (the GGUF exporter's families)."""
    if spec.qkv:
        raise FlapError("this family has a fused qkv projection; use input_projs/projection_weights")
    attn = attention_block(layer, spec)
    return tuple(getattr(attn, n) for n in (spec.q, spec.k, spec.v, spec.o))  # type: ignore[return-value]


def mlp_parts(layer: nn.Module, spec: ArchSpec) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
    """gate, up, down of a family with separate projections (the GGUF exporter's families)."""
    if spec.gate_up:
        raise FlapError("this family has a fused gate_up projection; use input_projs/projection_weights")
    mlp = mlp_block(layer, spec)
    return tuple(getattr(mlp, n) for n in (spec.gate, spec.up, spec.down))  # type: ignore[return-value]


def check_dense(model: nn.Module, spec: ArchSpec, dims: Dims) -> None:
    """Refuse a model whose layers no longer match its config (already pruned)."""
    if getattr(model.config, "flap_layers", None) is not None:
        raise FlapError("this model was already pruned by flap-llm; prune the original dense model instead")
    want = (dims.n_heads, dims.n_kv_heads, dims.d_ff)
    for i, layer in enumerate(decoder_layers(model, spec)):
        if input_widths(layer, spec, dims.head_dim) != want:
            raise FlapError(
                f"layer {i} does not have the dense shapes its config describes (was it pruned already?); "
                "prune the original dense model instead"
            )


def decoder_weight_params(model: nn.Module, spec: ArchSpec) -> int:
    """Weight parameters of all decoder attention and MLP projections (the ratio's denominator)."""
    total = 0
    for layer in decoder_layers(model, spec):
        for module in ("attn", "mlp"):
            for lin in (*input_projs(layer, spec, module), output_proj(layer, spec, module)):
                total += lin.weight.numel()
    return total


def model_params(model: nn.Module) -> int:
    """All distinct parameters (tied embeddings counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
