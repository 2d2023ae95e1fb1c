"""How a pruned model's layers map onto llama.cpp's `deci` architecture exactly (pure logic, no tensors).

`deci` reads per-layer head, KV-head and FFN widths, but three of its paths do not compute what a pruned
layer computes (see docs on GGUF):
- layer 0 must keep a head: the loader takes the head size from layer 0's head count;
- a layer with 0 heads is a pass-through that never adds attn_output.bias (the compensation constant);
- a layer with 0 MLP channels is skipped whole, attention output included.
The layout fixes each exactly: one all-zero head that carries o_proj's bias (layer 0), the constant folded
into the previous layer's ffn_down.bias (other layers), one all-zero MLP channel that carries down_proj's bias.
An all-zero head has zero queries and keys, so attention averages zero values: its output is exactly the bias.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DeciLayer:
    n_head: int  # query heads written (after padding)
    n_head_kv: int
    n_ff: int
    pad_head: bool = False  # write one all-zero head carrying o_proj's bias
    pad_ff: bool = False  # write one all-zero MLP channel carrying down_proj's bias
    fold_attn_bias: bool = False  # pass-through layer: o_proj's bias goes to the previous layer's ffn_down.bias


def deci_layout(widths: list[tuple[int, int, int]]) -> list[DeciLayer]:
    """widths: per layer (query heads, KV heads, MLP channels) of the pruned model."""
    out = []
    for i, (n_head, n_kv, n_ff) in enumerate(widths):
        if (n_head == 0) != (n_kv == 0):
            raise ValueError(f"layer {i}: {n_head} query heads with {n_kv} KV heads cannot be expressed")
        pad_head = n_head == 0 and i == 0
        fold = n_head == 0 and i > 0
        out.append(DeciLayer(1 if pad_head else n_head, 1 if pad_head else n_kv, max(n_ff, 1),
                             pad_head=pad_head, pad_ff=n_ff == 0, fold_attn_bias=fold))
    return out
