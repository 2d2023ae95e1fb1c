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
