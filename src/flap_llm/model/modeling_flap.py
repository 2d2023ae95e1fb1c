"""Modules for pruned models. Self-contained (torch only) so the file can be copied next to a
checkpoint and imported by stock transformers without flap_llm installed."""

from __future__ import annotations

import copy

import torch
from torch import nn


class ConstantAttention(nn.Module):
    """An attention block that lost every KV group: it outputs o_proj's bias (the compensated mean).

    It keeps the (empty) projections so state-dict keys stay the same, and still advances a KV cache
    with a one-element placeholder so the cache's sequence length stays right for generation.
    """

    def __init__(self, attn: nn.Module, layer_idx: int, o_name: str = "o_proj"):
        super().__init__()
        for name, child in attn.named_children():
            self.add_module(name, child)
        self.layer_idx = layer_idx
        self.o_name = o_name

    def forward(self, hidden_states: torch.Tensor, past_key_values=None, **kwargs):
        # hidden_states: [B, S, D] -> o_proj of an empty input = its bias, [B, S, D]
        o_proj = getattr(self, self.o_name)
        out = o_proj(hidden_states.new_zeros(*hidden_states.shape[:-1], 0))
        if past_key_values is not None:
            b, s = hidden_states.shape[:2]
            placeholder = hidden_states.new_zeros(b, 1, s, 1)
            past_key_values.update(placeholder, placeholder, self.layer_idx)
        return out, None


# ---------------------------------------------------------------------------------------------
# Rebuilding a pruned model from its config. config.flap_layers lists, per decoder layer,
# num_attention_heads, num_key_value_heads, intermediate_size and whether o_proj/down_proj carry
# the compensation bias; config.flap_modules names the submodules (written from flap-llm's architecture
# table, so this file holds no family knowledge of its own).

def _get(root: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        root = getattr(root, part)
    return root


def _linear_like(old: nn.Linear, d_in: int, d_out: int, bias: bool) -> nn.Linear:
    return nn.Linear(d_in, d_out, bias=bias, device=old.weight.device, dtype=old.weight.dtype)


def _resize_inputs(block: nn.Module, names: list[str], fused: str | None, d_in: int, widths: list[int]) -> None:
    """Separate projections get one width each; a fused one the sum of its parts."""
    parts = [fused] if fused else names
    sizes = [sum(widths)] if fused else widths
    for name, d_out in zip(parts, sizes):
        old = getattr(block, name)
        setattr(block, name, _linear_like(old, d_in, d_out, old.bias is not None))


def own_head_counts(attn: nn.Module, n_heads: int, n_kv: int) -> None:
    """An attention that reads its head counts from its config at run time (Phi-3) gets a per-layer copy."""
    attn.config = copy.copy(attn.config)
    attn.config.num_attention_heads, attn.config.num_key_value_heads = n_heads, n_kv
    if hasattr(attn, "num_key_value_heads"):
        attn.num_key_value_heads = n_kv


def resize_to_flap_layers(model: nn.Module, config) -> None:
    """Give every decoder layer the shapes recorded in config.flap_layers (weights come from the checkpoint)."""
    names = config.flap_modules
    # checkpoints written before head_dim was recorded: the families' own definition
    head_dim = names.get("head_dim") or getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    hidden = config.hidden_size
    for idx, (layer, shape) in enumerate(zip(_get(model, names["layers"]), config.flap_layers)):
        attn, mlp = getattr(layer, names["attn"]), getattr(layer, names["mlp"])
        n_heads, n_kv = shape["num_attention_heads"], shape["num_key_value_heads"]
        q_out, kv_out = n_heads * head_dim, n_kv * head_dim
        _resize_inputs(attn, [names["q"], names["k"], names["v"]], names.get("qkv"), hidden, [q_out, kv_out, kv_out])
        old = getattr(attn, names["o"])
        setattr(attn, names["o"], _linear_like(old, q_out, hidden, shape["o_proj_bias"]))
        d_ff = shape["intermediate_size"]
        _resize_inputs(mlp, [names["gate"], names["up"]], names.get("gate_up"), hidden, [d_ff, d_ff])
        old = getattr(mlp, names["down"])
        setattr(mlp, names["down"], _linear_like(old, d_ff, hidden, shape["down_proj_bias"]))
        if names.get("attn_reads_config"):
            own_head_counts(attn, n_heads, n_kv)
        if n_heads == 0:
            setattr(layer, names["attn"], ConstantAttention(attn, idx, names["o"]))


_CLASSES: dict[str, type] = {}


def flap_class(base_name: str) -> type:
    """The pruned-model class for a transformers causal-LM class name (FlapLlamaForCausalLM, ...)."""
    if base_name not in _CLASSES:
        import transformers

        base = getattr(transformers, base_name)

        class FlapPruned(base):
            def __init__(self, config):
                super().__init__(config)
                resize_to_flap_layers(self, config)

        FlapPruned.__name__ = FlapPruned.__qualname__ = "Flap" + base_name
        _CLASSES[base_name] = FlapPruned
    return _CLASSES[base_name]


def __getattr__(name: str) -> type:
    # transformers' auto_map imports "modeling_flap.Flap<Base>": built on demand from the stock class
    if name.startswith("Flap") and name.endswith("ForCausalLM"):
        try:
            return flap_class(name[len("Flap"):])
        except AttributeError:
            pass
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
