"""Serving pruned checkpoints in vLLM.

A flap checkpoint folder (format "flap") serves unchanged: installing flap-llm into vLLM's environment registers,
through vLLM's plugin entry point (`vllm.general_plugins`), one model class per served family that builds every
decoder layer with its own query heads, KV heads and MLP width and adds the compensation biases of layers that lost
all their heads or channels. Nothing here imports vLLM until vLLM calls `register`, and nothing imports the rest of
flap-llm, so the hook costs vLLM's processes nothing.
"""

from __future__ import annotations

# The transformers classes whose pruned checkpoints vLLM serves, and for each other family why it does not.
SERVED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
NOT_SERVED = {
    "Qwen3ForCausalLM": "Qwen3's attention normalizes each query and key head (q_norm/k_norm), which our vLLM layer "
                        "does not build yet",
    "Gemma3ForCausalLM": "Gemma 3's layers carry four norms, a scaled embedding and local/global attention, which our "
                         "vLLM layer does not build",
    "Phi3ForCausalLM": "Phi-3 stores fused qkv_proj/gate_up_proj weights whose per-layer split our vLLM loader does "
                       "not read yet",
    "GraniteForCausalLM": "Granite scales embeddings, residuals, attention and logits by multipliers our vLLM layer "
                          "does not apply",
}


def vllm_refusal(base_architecture: str) -> str | None:
    """Why vLLM can't serve a pruned model of this transformers class through flap-llm, or None when it can."""
    if base_architecture in SERVED:
        return None
    reason = NOT_SERVED.get(base_architecture, f"flap-llm has no vLLM model for {base_architecture}")
    return (f"vLLM can't serve a pruned {base_architecture} from flap-llm: {reason}. vLLM serves pruned "
            f"{', '.join(SERVED)} checkpoints; serve this one with transformers (trust_remote_code=True) or llama.cpp")


def register() -> None:
    """vLLM's plugin hook (entry point group `vllm.general_plugins`): name our model classes, imported lazily."""
    from vllm import ModelRegistry

    for base in (*SERVED, *NOT_SERVED):
        ModelRegistry.register_model(f"Flap{base}", f"flap_llm.serving.vllm_model:Flap{base}")
