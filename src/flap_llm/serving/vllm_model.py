"""vLLM model classes for pruned checkpoints (imported by vLLM, through flap_llm.serving.register, only).

A pruned Llama, Mistral or Qwen2 is vLLM's Llama with one change: each decoder layer is built from its own entry of
`config.flap_layers` (query heads, KV heads, MLP width, whether o_proj/down_proj carry FLAP's compensation bias).
A layer that kept no KV group has no attention and no KV cache: it adds o_proj's bias, the attention's mean output,
to the residual stream. A layer that kept no MLP channel adds down_proj's bias the same way.

vLLM keeps the residual apart from the branch output and adds them in the next fused add-RMSNorm; a constant branch
follows the same convention, so the sums are the ones transformers computes.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import MergedColumnParallelLinear, RowParallelLinear
from vllm.model_executor.models.llama import LlamaAttention, LlamaForCausalLM
from vllm.model_executor.models.utils import extract_layer_index

from . import vllm_refusal

# q/k/v biases of the unpruned family (o_proj's and down_proj's come from flap_layers and the base config)
_QKV_BIAS = {"Qwen2ForCausalLM": True}


class FlapMLP(nn.Module):
    """Gated SiLU MLP of one width; down_proj may carry the compensation bias without gate/up having one."""

    def __init__(self, hidden: int, width: int, bias: bool, down_bias: bool, quant_config, prefix: str):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden, [width] * 2, bias=bias, quant_config=quant_config,
                                                       prefix=f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(width, hidden, bias=bias or down_bias, quant_config=quant_config,
                                           prefix=f"{prefix}.down_proj")
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self.gate_up_proj(x)
        x, _ = self.down_proj(self.act_fn(x))
        return x


class FlapDecoderLayer(nn.Module):
    """One decoder layer with the shapes flap_layers records for it (vLLM's LlamaDecoderLayer otherwise)."""

    def __init__(self, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        quant_config = vllm_config.quant_config
        shape = config.flap_layers[extract_layer_index(prefix)]
        hidden, eps = config.hidden_size, config.rms_norm_eps
        base = config.flap_base_architecture
        attention_bias = bool(getattr(config, "attention_bias", False))
        mlp_bias = bool(getattr(config, "mlp_bias", False))

        self.self_attn = self.input_layernorm = self.attention_constant = None
        if shape["num_attention_heads"]:
            self.input_layernorm = RMSNorm(hidden, eps=eps)
            self.self_attn = LlamaAttention(
                config=config, hidden_size=hidden, num_heads=shape["num_attention_heads"],
                num_kv_heads=shape["num_key_value_heads"],
                max_position_embeddings=getattr(config, "max_position_embeddings", 8192), quant_config=quant_config,
                bias=_QKV_BIAS.get(base, attention_bias), bias_o_proj=attention_bias or shape["o_proj_bias"],
                cache_config=vllm_config.cache_config, prefix=f"{prefix}.self_attn")
        elif shape["o_proj_bias"] or attention_bias:
            self.attention_constant = nn.Parameter(torch.empty(hidden), requires_grad=False)

        self.mlp = self.post_attention_layernorm = self.mlp_constant = None
        if shape["intermediate_size"]:
            self.post_attention_layernorm = RMSNorm(hidden, eps=eps)
            self.mlp = FlapMLP(hidden, shape["intermediate_size"], mlp_bias, shape["down_proj_bias"], quant_config,
                               prefix=f"{prefix}.mlp")
        elif shape["down_proj_bias"] or mlp_bias:
            self.mlp_constant = nn.Parameter(torch.empty(hidden), requires_grad=False)

    @staticmethod
    def _constant(residual: torch.Tensor, constant: nn.Parameter | None) -> torch.Tensor:
        out = torch.zeros_like(residual)
        return out if constant is None else out + constant

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None,
                **_: object) -> tuple[torch.Tensor, torch.Tensor]:
        # hidden_states: the previous branch's output, [T, D]; residual: the stream before it (None at layer 0)
        if self.self_attn is not None:
            if residual is None:
                residual, hidden_states = hidden_states, self.input_layernorm(hidden_states)
            else:
                hidden_states, residual = self.input_layernorm(hidden_states, residual)
            hidden_states = self.self_attn(positions=positions, hidden_states=hidden_states)
        else:
            residual = hidden_states if residual is None else residual + hidden_states
            hidden_states = self._constant(residual, self.attention_constant)
        if self.mlp is not None:
            hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
            hidden_states = self.mlp(hidden_states)
        else:
            residual = residual + hidden_states
            hidden_states = self._constant(residual, self.mlp_constant)
        return hidden_states, residual


class _FlapCausalLM(LlamaForCausalLM):
    """vLLM's Llama with FlapDecoderLayer; reads the checkpoint that flap-llm's format "flap" writes."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        config = vllm_config.model_config.hf_config
        refusal = vllm_refusal(getattr(config, "flap_base_architecture", None) or "")
        if refusal or not getattr(config, "flap_layers", None):
            raise ValueError(refusal or "config.json has no flap_layers: this is not a checkpoint pruned by flap-llm")
        if len(config.flap_layers) != config.num_hidden_layers:
            raise ValueError(f"config.json lists {len(config.flap_layers)} flap_layers for "
                             f"{config.num_hidden_layers} layers; re-save the checkpoint with flap-llm")
        # LlamaAttention sizes heads from config.head_dim (else hidden_size / heads, wrong once heads are removed)
        config.head_dim = config.flap_modules.get("head_dim") or getattr(config, "head_dim", None) \
            or config.hidden_size // config.num_attention_heads
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=FlapDecoderLayer)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return super().load_weights(self._renamed(weights))

    def _renamed(self, weights: Iterable[tuple[str, torch.Tensor]]):
        """The checkpoint's tensors under this model's names: removed blocks' empty weights and unused norms are
        skipped, and their o_proj/down_proj biases load as the layer's constants."""
        layers = self.model.layers
        for name, tensor in weights:
            if tensor.numel() == 0:
                continue
            parts = name.split(".")
            if len(parts) > 3 and parts[0] == "model" and parts[1] == "layers":
                layer = layers[int(parts[2])]
                tail = ".".join(parts[3:])
                if layer.self_attn is None:
                    if tail == "input_layernorm.weight" or tail.startswith("self_attn.") and tail != "self_attn.o_proj.bias":
                        continue
                    if tail == "self_attn.o_proj.bias":
                        name = f"model.layers.{parts[2]}.attention_constant"
                if layer.mlp is None:
                    if tail == "post_attention_layernorm.weight" or tail.startswith("mlp.") and tail != "mlp.down_proj.bias":
                        continue
                    if tail == "mlp.down_proj.bias":
                        name = f"model.layers.{parts[2]}.mlp_constant"
            yield name, tensor


def _served(base: str) -> type:
    cls = type(f"Flap{base}", (_FlapCausalLM,), {"__doc__": f"A pruned {base} in vLLM."})
    cls.__module__ = __name__
    return cls


# One class per name registered with vLLM (flap_llm.serving.register); families we can't serve refuse in __init__.
FlapLlamaForCausalLM = _served("LlamaForCausalLM")
FlapMistralForCausalLM = _served("MistralForCausalLM")
FlapQwen2ForCausalLM = _served("Qwen2ForCausalLM")
FlapQwen3ForCausalLM = _served("Qwen3ForCausalLM")
FlapGemma3ForCausalLM = _served("Gemma3ForCausalLM")
FlapPhi3ForCausalLM = _served("Phi3ForCausalLM")
FlapGraniteForCausalLM = _served("GraniteForCausalLM")
