"""Modules for pruned models. Self-contained (torch only) so the file can be copied next to a
checkpoint and imported by stock transformers without flap_llm installed."""

from __future__ import annotations

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
# the compensation bias; config.flap_modules names the submodules.

_DEFAULT_MODULES = {"layers": "model.layers", "attn": "self_attn", "q": "q_proj", "k": "k_proj", "v": "v_proj",
                    "o": "o_proj", "mlp": "mlp", "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


def _get(root: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        root = getattr(root, part)
    return root


def _linear_like(old: nn.Linear, d_in: int, d_out: int, bias: bool) -> nn.Linear:
    return nn.Linear(d_in, d_out, bias=bias, device=old.weight.device, dtype=old.weight.dtype)


def resize_to_flap_layers(model: nn.Module, config) -> None:
    """Give every decoder layer the shapes recorded in config.flap_layers (weights come from the checkpoint)."""
    names = {**_DEFAULT_MODULES, **(getattr(config, "flap_modules", None) or {})}
    n_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    hidden = config.hidden_size
    for idx, (layer, shape) in enumerate(zip(_get(model, names["layers"]), config.flap_layers)):
        attn, mlp = getattr(layer, names["attn"]), getattr(layer, names["mlp"])
        q_out = shape["num_attention_heads"] * head_dim
        kv_out = shape["num_key_value_heads"] * head_dim
        for key, d_in, d_out in (("q", hidden, q_out), ("k", hidden, kv_out), ("v", hidden, kv_out)):
            old = getattr(attn, names[key])
            setattr(attn, names[key], _linear_like(old, d_in, d_out, old.bias is not None))
        old = getattr(attn, names["o"])
        setattr(attn, names["o"], _linear_like(old, q_out, hidden, shape["o_proj_bias"]))
        d_ff = shape["intermediate_size"]
        for key in ("gate", "up"):
            old = getattr(mlp, names[key])
            setattr(mlp, names[key], _linear_like(old, hidden, d_ff, old.bias is not None))
        old = getattr(mlp, names["down"])
        setattr(mlp, names["down"], _linear_like(old, d_ff, hidden, shape["down_proj_bias"]))
        if shape["num_attention_heads"] == 0:
            setattr(layer, names["attn"], ConstantAttention(attn, idx, names["o"]))


def _flap_class(base: type) -> type:
    class FlapPruned(base):
        def __init__(self, config):
            super().__init__(config)
            resize_to_flap_layers(self, config)

    FlapPruned.__name__ = FlapPruned.__qualname__ = "Flap" + base.__name__
    return FlapPruned


def _base_classes() -> dict[str, type]:
    import transformers

    names = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
    return {n: getattr(transformers, n) for n in names}


_BASES = _base_classes()
FlapLlamaForCausalLM = _flap_class(_BASES["LlamaForCausalLM"])
FlapMistralForCausalLM = _flap_class(_BASES["MistralForCausalLM"])
FlapQwen2ForCausalLM = _flap_class(_BASES["Qwen2ForCausalLM"])
FlapQwen3ForCausalLM = _flap_class(_BASES["Qwen3ForCausalLM"])
FLAP_CLASSES = {
    "LlamaForCausalLM": FlapLlamaForCausalLM,
    "MistralForCausalLM": FlapMistralForCausalLM,
    "Qwen2ForCausalLM": FlapQwen2ForCausalLM,
    "Qwen3ForCausalLM": FlapQwen3ForCausalLM,
}
