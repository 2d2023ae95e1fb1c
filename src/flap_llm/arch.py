"""Everything model-family-specific, in one table keyed by the Hugging Face architecture name.

A new family is one entry here plus a tiny-config test.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .errors import FlapError


@dataclass(frozen=True)
class ArchSpec:
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
    qkv_bias: bool = False  # q/k/v carry biases that must be sliced with their rows
    qk_norm: bool = False  # per-head RMSNorm on q and k (weights of size head_dim, shared by heads)
    embed: str = "model.embed_tokens"
    attn_norm: str = "input_layernorm"  # inside a decoder layer
    mlp_norm: str = "post_attention_layernorm"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    # Why llama.cpp's `deci` architecture cannot compute this family exactly (None: it can).
    gguf_unsupported: str | None = None


ARCHITECTURES: dict[str, ArchSpec] = {
    "LlamaForCausalLM": ArchSpec(),
    "MistralForCausalLM": ArchSpec(),
    "Qwen2ForCausalLM": ArchSpec(qkv_bias=True),
    "Qwen3ForCausalLM": ArchSpec(qk_norm=True, gguf_unsupported="llama.cpp's deci architecture has no per-head "
                                 "q/k norms (Qwen3)"),
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


def dims_of(model: nn.Module) -> Dims:
    c = model.config
    n_heads = c.num_attention_heads
    n_kv = getattr(c, "num_key_value_heads", None) or n_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // n_heads
    if n_heads % n_kv:
        raise FlapError(f"num_attention_heads {n_heads} is not a multiple of num_key_value_heads {n_kv}")
    return Dims(c.num_hidden_layers, n_heads, n_kv, head_dim, c.hidden_size, c.intermediate_size)


def attention_parts(layer: nn.Module, spec: ArchSpec) -> tuple[nn.Linear, nn.Linear, nn.Linear, nn.Linear]:
    attn = getattr(layer, spec.attn)
    return tuple(getattr(attn, n) for n in (spec.q, spec.k, spec.v, spec.o))  # type: ignore[return-value]


def mlp_parts(layer: nn.Module, spec: ArchSpec) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
    mlp = getattr(layer, spec.mlp)
    return tuple(getattr(mlp, n) for n in (spec.gate, spec.up, spec.down))  # type: ignore[return-value]


def check_dense(model: nn.Module, spec: ArchSpec, dims: Dims) -> None:
    """Refuse a model whose layers no longer match its config (already pruned)."""
    if getattr(model.config, "flap_layers", None) is not None:
        raise FlapError("this model was already pruned by flap-llm; prune the original dense model instead")
    want = (dims.n_heads * dims.head_dim, dims.n_kv_heads * dims.head_dim, dims.d_ff)
    for i, layer in enumerate(decoder_layers(model, spec)):
        q, k, _, _ = attention_parts(layer, spec)
        gate, _, _ = mlp_parts(layer, spec)
        if (q.out_features, k.out_features, gate.out_features) != want:
            raise FlapError(
                f"layer {i} does not have the dense shapes its config describes (was it pruned already?); "
                "prune the original dense model instead"
            )


def decoder_weight_params(model: nn.Module, spec: ArchSpec) -> int:
    """Weight parameters of all decoder attention and MLP projections (the ratio's denominator)."""
    total = 0
    for layer in decoder_layers(model, spec):
        for lin in (*attention_parts(layer, spec), *mlp_parts(layer, spec)):
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
