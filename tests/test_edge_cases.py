"""Layers that lose every attention group or every MLP channel still run, with a KV cache."""

from __future__ import annotations

import pytest
import torch

import flap_llm
from flap_llm.model.arch import dims_of, spec_of
from flap_llm.errors import FlapError
from flap_llm.model.modeling_flap import ConstantAttention
from flap_llm.model.plan import LayerPlan, PrunePlan
from conftest import calibration, tiny_model


def _plan_without(model, empty_attn_layer: int | None, empty_mlp_layer: int | None) -> PrunePlan:
    dims = dims_of(model)
    layers = []
    for i in range(dims.n_layers):
        kv = () if i == empty_attn_layer else tuple(range(dims.n_kv_heads))
        heads = tuple(k * dims.group_size + j for k in kv for j in range(dims.group_size))
        ch = () if i == empty_mlp_layer else tuple(range(0, dims.d_ff, 2))
        layers.append(LayerPlan(heads, kv, ch))
    return PrunePlan(tuple(layers))


def _greedy(model, prompt, n):
    """Greedy decoding without a cache: the reference for cached generation."""
    ids = prompt
    with torch.no_grad():
        for _ in range(n):
            nxt = model(ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
    return ids


def test_empty_attention_and_mlp_layers_run_and_generate(arch):
    for empty_layer in (0, 1):
        model = tiny_model(arch)
        plan = _plan_without(model, empty_attn_layer=empty_layer, empty_mlp_layer=1 - empty_layer)
        masked = tiny_model(arch)
        flap_llm.apply_plan(model, plan)
        flap_llm.apply_plan(masked, plan, mode="mask")
        assert isinstance(model.model.layers[empty_layer].self_attn, ConstantAttention)
        assert model.model.layers[1 - empty_layer].mlp.down_proj.in_features == 0
        ids = calibration(n=2, length=6)
        with torch.no_grad():
            out = model(ids).logits
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, masked(ids).logits, rtol=1e-5, atol=1e-5)
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                             use_cache=True, pad_token_id=0)
        assert gen.shape == (2, 12)
        assert torch.equal(gen, _greedy(model, ids, 6))


def test_empty_attention_output_is_compensated_bias():
    """When AL-AM-like plans empty a layer, the block outputs the mean it used to output."""
    model = tiny_model("llama-mha")
    ids = calibration()
    spec, dims = spec_of(model), dims_of(model)
    from flap_llm.methods.flap import bias_updates
    from flap_llm.calibration.walk import as_batches, collect_statistics
    stats = collect_statistics(model, spec, as_batches(ids, 4, 96))
    plan = _plan_without(model, empty_attn_layer=0, empty_mlp_layer=None)
    updates = bias_updates(model, spec, dims, plan, stats)
    x = []
    h = model.model.layers[0].self_attn.o_proj.register_forward_hook(lambda m, a, o: x.append(o))
    with torch.no_grad():
        model(ids)
    h.remove()
    dense_mean = x[0].reshape(-1, 64).double().mean(0)
    flap_llm.apply_plan(model, plan, updates)
    attn = model.model.layers[0].self_attn
    out, _ = attn(torch.zeros(1, 3, 64))
    torch.testing.assert_close(out[0, 0].double(), dense_mean, rtol=1e-4, atol=1e-5)


def test_everything_pruned_by_flap_still_generates():
    """A very high ratio with AL-AM may empty layers; the model must still decode."""
    model = tiny_model("llama-gqa", layers=3)
    ids = calibration()
    flap_llm.prune(model, ids, flap_llm.PruneConfig(ratio=0.95))
    gen = model.generate(ids[:1, :4], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert gen.shape == (1, 9)
    assert torch.equal(gen, _greedy(model, ids[:1, :4], 5))


def test_training_windows_take_an_equal_share_of_each_text(tmp_path):
    """heal --data a,b: the windows come from every text named, in order, each as its own calibration draw;
    a file whose name holds a comma is one text; an empty name is refused."""
    from flap_llm.calibration.data import calibration_windows, training_windows
    from conftest import tiny_tokenizer
    tok = tiny_tokenizer()
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    b.write_text("A stitch in time saves nine, they say. " * 40)
    both = training_windows(f"{a},{b}", tok, 7, 10, 3)
    assert both.shape == (7, 10)
    assert torch.equal(both[:4], calibration_windows(str(a), tok, 4, 10, 3))
    assert torch.equal(both[4:], calibration_windows(str(b), tok, 4, 10, 3)[:3])
    assert torch.equal(training_windows(str(a), tok, 5, 10, 3), calibration_windows(str(a), tok, 5, 10, 3))
    odd = tmp_path / "x,y.txt"
    odd.write_text(a.read_text())
    assert torch.equal(training_windows(str(odd), tok, 5, 10, 3), calibration_windows(str(a), tok, 5, 10, 3))
    with pytest.raises(FlapError, match="empty text name"):
        training_windows(f"{a},,{b}", tok, 4, 10, 3)


def test_calibration_windows_start_with_bos_when_the_tokenizer_adds_one(tmp_path):
    """As the evaluation windows do; a tokenizer without BOS gets plain random windows, as before."""
    from flap_llm.calibration.data import calibration_windows, sample_windows, tokenize_corpus, load_texts
    from conftest import tiny_tokenizer
    from transformers import PreTrainedTokenizerFast
    plain = tiny_tokenizer()
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    windows = calibration_windows(str(text), plain, 6, 12, 0)
    assert torch.equal(windows, sample_windows(tokenize_corpus(load_texts(str(text), "calib"), plain), 6, 12, 0))
    tok = PreTrainedTokenizerFast(tokenizer_object=plain.backend_tokenizer, eos_token="<eos>", bos_token="<eos>")
    from tokenizers.processors import TemplateProcessing
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<eos> $A", special_tokens=[("<eos>", 0)])
    assert tok("a").input_ids[0] == 0
    with_bos = calibration_windows(str(text), tok, 6, 12, 0)
    assert with_bos.shape == (6, 12) and (with_bos[:, 0] == 0).all() and (with_bos[:, 1:] != 0).all()
