"""The architecture table: every entry is a tested family; fused projections compute what separate ones do."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import flap_llm
from flap_llm import FlapError
from flap_llm.model.arch import ARCHITECTURES, architecture_of, input_widths, projection_weights, spec_of
from flap_llm.export import save_gguf
from flap_llm.calibration.walk import as_batches, collect_statistics
from conftest import ARCHS, VOCAB, calibration, tiny_model


def test_every_table_entry_has_a_tiny_model_in_the_tests():
    covered = {architecture_of(tiny_model(a)) for a in ARCHS}
    assert covered == set(ARCHITECTURES)


def _unfused_copy(phi3) -> LlamaForCausalLM:
    """The same weights with q/k/v and gate/up as separate matrices, in a stock LLaMA."""
    c = phi3.config
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                                         intermediate_size=c.intermediate_size, num_hidden_layers=c.num_hidden_layers,
                                         num_attention_heads=c.num_attention_heads,
                                         num_key_value_heads=c.num_key_value_heads, head_dim=16,
                                         max_position_embeddings=c.max_position_embeddings,
                                         rms_norm_eps=c.rms_norm_eps, tie_word_embeddings=False)).eval()
    spec = spec_of(phi3)
    state = {k: v for k, v in phi3.state_dict().items() if "qkv_proj" not in k and "gate_up_proj" not in k}
    for i, layer in enumerate(phi3.model.layers):
        w = projection_weights(layer, spec, 16)
        for name, module in (("q", "self_attn"), ("k", "self_attn"), ("v", "self_attn"), ("gate", "mlp"), ("up", "mlp")):
            state[f"model.layers.{i}.{module}.{name}_proj.weight"] = w[name]
    llama.load_state_dict(state, strict=True)
    return llama


def test_phi3_fused_statistics_and_plan_equal_an_unfused_copy():
    phi3 = tiny_model("phi3", layers=3)
    llama = _unfused_copy(phi3)
    ids = calibration()
    with torch.no_grad():
        torch.testing.assert_close(phi3(ids).logits, llama(ids).logits, rtol=1e-5, atol=1e-5)
    batches = as_batches(ids, 4, VOCAB)
    for a, b in zip(collect_statistics(phi3, spec_of(phi3), batches), collect_statistics(llama, spec_of(llama), batches)):
        torch.testing.assert_close(a.attn.sum, b.attn.sum, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(a.mlp.sumsq, b.mlp.sumsq, rtol=1e-9, atol=1e-9)
    cfg = flap_llm.PruneConfig(ratio=0.5)
    r_phi, r_llama = flap_llm.prune(phi3, ids, cfg), flap_llm.prune(llama, ids, cfg)
    assert r_phi.plan == r_llama.plan
    # the fused matrices hold exactly the kept rows of each part
    for lp, lay_phi, lay_llama in zip(r_phi.plan.layers, phi3.model.layers, llama.model.layers):
        assert input_widths(lay_phi, spec_of(phi3), 16) == (len(lp.heads), len(lp.kv_heads), len(lp.channels))
        wp, wl = projection_weights(lay_phi, spec_of(phi3), 16), projection_weights(lay_llama, spec_of(llama), 16)
        for name in ("q", "k", "v", "gate", "up", "o", "down"):
            torch.testing.assert_close(wp[name], wl[name], rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(phi3(ids).logits, llama(ids).logits, rtol=1e-5, atol=1e-5)


def test_phi3_pruned_attention_reads_its_own_head_count():
    """Phi-3's attention splits qkv by its config's head count: each pruned layer gets its own."""
    phi3 = tiny_model("phi3", layers=3)
    flap_llm.prune(phi3, calibration(), flap_llm.PruneConfig(ratio=0.5, structure="AL-MM", remove_heads=4))
    attns = [layer.self_attn for layer in phi3.model.layers if hasattr(layer.self_attn, "config")]
    counts = [a.config.num_attention_heads for a in attns]
    assert phi3.config.num_attention_heads == 4 and any(0 < c < 4 for c in counts)
    for attn, c in zip(attns, counts):
        assert attn.o_proj.in_features == c * 16 and attn.num_key_value_heads == c // 2


@pytest.mark.parametrize("arch, reason", [("gemma3", "Gemma 3"), ("phi3", "Phi-3"), ("granite", "Granite"),
                                          ("qwen3", "Qwen3")])
def test_families_deci_cannot_compute_are_refused_by_the_gguf_exporter(tmp_path, arch, reason):
    """Their own llama.cpp architectures hold only the same widths in every layer (test_depth.py); a FLAP plan
    gives each layer its own."""
    from conftest import calibration, tiny_tokenizer
    model = tiny_model(arch)
    flap_llm.prune(model, calibration(), flap_llm.PruneConfig(ratio=0.5))
    with pytest.raises(FlapError, match=reason):
        save_gguf(model, tmp_path / "m.gguf", tiny_tokenizer(), "f32")
    assert list(tmp_path.iterdir()) == []
