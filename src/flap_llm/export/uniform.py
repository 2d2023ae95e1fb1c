"""Format "hf-uniform": a plain checkpoint of a stock architecture (the family's own; LLaMA with biases for a
Qwen2 or Mistral plan whose compensation adds output biases), for plans in which every layer keeps the same
shapes, depth-pruned models (fewer layers) among them. Stock transformers loads it without remote code."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..model.arch import (ARCHITECTURES, applied_window, architecture_of, config_head_dim, decoder_layers,
    input_projs, spec_of)
from ..errors import FlapError
from .base import CheckpointFormat


class UniformFormat(CheckpointFormat):
    name = "hf-uniform"
    summary = "stock transformers, uniform plans"

    def weights(self, model: nn.Module) -> nn.Module:
        return _uniform_export(model)

    def loads(self, folder: Path, dtype=None):
        from transformers import AutoModelForCausalLM
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, output_loading_info=True)


def _is_uniform(shapes: list[dict]) -> bool:
    return all(s == shapes[0] for s in shapes)


def _uniform_export(model: nn.Module) -> nn.Module:
    """A stock-architecture copy of a uniformly pruned model, with identical logits."""
    from transformers import AutoConfig, AutoModelForCausalLM

    shapes = getattr(model.config, "flap_layers", None)
    arch = architecture_of(model)
    if shapes and not _is_uniform(shapes):
        raise FlapError("format='hf-uniform' needs every layer to keep the same shapes, but this plan is not "
                        "uniform (use structure UL-UM or UL-MM with remove_heads a multiple of the layers, "
                        "or save with format='flap')")
    cfg = model.config.to_dict()
    for key in ("flap_layers", "flap_mode", "flap_source", "flap_kept_layers", "auto_map", "architectures",
                "_name_or_path"):
        cfg.pop(key, None)
    spec = spec_of(model)
    s = shapes[0] if shapes else None
    if s is not None:
        if s["num_attention_heads"] == 0:
            raise FlapError("format='hf-uniform' cannot express layers without attention heads; use format='flap'")
        if model.config.hidden_size % s["num_attention_heads"]:
            raise FlapError(f"format='hf-uniform': stock transformers refuses {s['num_attention_heads']} attention heads "
                            f"with hidden_size {model.config.hidden_size} (not a multiple), so no stock checkpoint can "
                            "hold this plan; save with format='flap' or export a GGUF (flap_llm.save_gguf)")
        cfg.update(num_attention_heads=s["num_attention_heads"], num_key_value_heads=s["num_key_value_heads"],
                   intermediate_size=s["intermediate_size"], head_dim=config_head_dim(model.config))
    needs_bias = bool(s and (s["o_proj_bias"] or s["down_proj_bias"]))
    # the family's own class, unless it cannot hold the compensation's output biases
    target = (spec.uniform_class or arch) if needs_bias else arch
    if target != arch:
        # the stock class holds the same computation with biases (LLaMA for Qwen2 and Mistral), but no window
        if applied_window(model) is not None:
            raise FlapError(f"{arch} with a sliding window cannot be exported as a biased {target}; use format='flap'")
        import transformers

        target_spec = ARCHITECTURES[target]
        q_bias = input_projs(decoder_layers(model, spec)[0], spec, "attn")[0].bias is not None  # Qwen2's q/k/v
        cfg[target_spec.uniform_bias_keys[0]] = q_bias
        cfg["model_type"] = getattr(transformers, target).config_class.model_type
    else:
        target_spec = spec
    for key, flag, what in zip(target_spec.uniform_bias_keys, ("o_proj_bias", "down_proj_bias"), ("attention", "MLP")):
        if not (s and s[flag]):
            continue
        if key is None:
            raise FlapError(f"the stock {target} has no {what} output bias, so the compensation cannot be stored in "
                            "format 'hf-uniform'; use format='flap' or compensation='none'")
        cfg[key] = True
    model_type = cfg.pop("model_type")
    config = AutoConfig.for_model(model_type, **cfg)
    config.architectures = [target]
    out = AutoModelForCausalLM.from_config(config, dtype=next(model.parameters()).dtype)
    state = model.state_dict()
    full = out.state_dict()
    missing = [k for k in full if k not in state]
    if any(not k.endswith(".bias") for k in missing):
        raise FlapError(f"cannot map this model onto a stock {target}: missing {missing[:3]}")
    for k in missing:  # biases the stock config adds but the model does not use: exact zeros
        state[k] = torch.zeros_like(full[k])
    unexpected = [k for k in state if k not in full]
    if unexpected:
        raise FlapError(f"cannot map this model onto a stock {target}: it would drop {unexpected[:3]}")
    out.load_state_dict(state, strict=True)
    return out
