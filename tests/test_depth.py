"""--method depth: whole blocks removed, the result in the family's own class (stock transformers, no remote code)
and in the family's own llama.cpp architecture, checked in llama.cpp itself."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import flap_llm
from flap_llm import FlapError
from flap_llm.export import save_gguf
from flap_llm.methods.depth import blocks_to_remove
from flap_llm.model.checkpoint import save_pruned
from flap_llm.model.plan import PrunePlan

from conftest import ARCHS, calibration, tiny_checkpoint, tiny_model, tiny_tokenizer
from test_gguf import _llama_vs_transformers, _read, needs_llama


def _depth(arch: str, ratio: float = 0.34, layers: int = 6):
    model = tiny_model(arch, layers=layers)
    result = flap_llm.prune(model, calibration(length=32), flap_llm.PruneConfig(ratio=ratio, method="depth"))
    return model, result


def _skipping(arch: str, dropped, layers: int = 6):
    """The dense model with the dropped blocks turned into identities by hooks (the reference)."""
    ref = tiny_model(arch, layers=layers)

    def identity(module, args, kwargs, output):
        h = args[0] if args else kwargs["hidden_states"]
        return (h, *output[1:]) if isinstance(output, tuple) else h

    for i in dropped:
        ref.model.layers[i].register_forward_hook(identity, with_kwargs=True)
    return ref


def test_blocks_to_remove_rounds_to_whole_blocks():
    assert [blocks_to_remove(r, 18) for r in (0.0, 0.01, 0.2, 0.25, 0.35)] == [0, 1, 4, 5, 6]
    assert blocks_to_remove(0.2, 30) == 6 and blocks_to_remove(0.35, 24) == 8
    with pytest.raises(FlapError, match="all 2 blocks"):
        blocks_to_remove(0.9, 2)


def test_depth_equals_the_dense_model_without_its_blocks_and_loads_stock(tmp_path, arch):
    from transformers import AutoModelForCausalLM
    model, result = _depth(arch)
    dropped = result.plan.dropped
    assert len(dropped) == 2 and model.config.num_hidden_layers == 4 and len(model.model.layers) == 4
    assert result.report["params"]["decoder_removed_fraction"] == pytest.approx(2 / 6)
    assert result.report["layers"]["blocks_removed"] == list(dropped)
    assert model.config.flap_kept_layers == [i for i in range(6) if i not in dropped]
    x = calibration(3, 24, seed=5)  # longer than Gemma 3's sliding window of 6
    with torch.no_grad():
        want = _skipping(arch, dropped)(x).logits
        got = model(x).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    save_pruned(model, tmp_path / "out", format="hf-uniform")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "auto_map" not in cfg and not any(k.startswith("flap_") for k in cfg)
    assert cfg["num_hidden_layers"] == 4
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # no trust_remote_code
    assert type(stock).__name__ == type(model).__name__  # the family's own class
    if getattr(model.config, "layer_types", None):
        dense_types = tiny_model(arch, layers=6).config.layer_types
        assert stock.config.layer_types == [dense_types[i] for i in model.config.flap_kept_layers]
    with torch.no_grad():
        torch.testing.assert_close(stock(x).logits, want, rtol=0, atol=1e-5)


def test_gemma3_keeps_each_kept_layers_own_pattern():
    model, result = _depth("gemma3")
    dense = tiny_model("gemma3", layers=6).config.layer_types
    kept = [i for i in range(6) if i not in result.plan.dropped]
    assert model.config.layer_types == [dense[i] for i in kept]
    for new, layer in enumerate(model.model.layers):
        assert layer.self_attn.layer_idx == new
        assert layer.self_attn.is_sliding == (dense[kept[new]] == "sliding_attention")


def test_loss_score_picks_the_blocks_whose_removal_costs_least(monkeypatch):
    from flap_llm.methods import depth
    monkeypatch.setattr(depth, "loss_without_each", lambda job: [5.0, 1.0, 4.0, 0.5, 3.0, 2.0])
    _, result = _depth("llama-gqa")
    assert result.plan.dropped == (1, 3)


def test_plan_round_trips_and_checks_dropped_layers():
    _, result = _depth("llama-gqa")
    plan = PrunePlan.from_dict(json.loads(json.dumps(result.plan.to_dict())))
    assert plan == result.plan and plan.dropped
    from flap_llm.model.arch import dims_of
    dims = dims_of(tiny_model("llama-gqa", layers=6))
    bad = PrunePlan(plan.layers, (plan.dropped[0], plan.dropped[0]))
    with pytest.raises(FlapError, match="sorted, unique"):
        bad.validate(dims)
    full = next(i for i in range(6) if i not in plan.dropped)
    with pytest.raises(FlapError, match="must keep no heads"):
        PrunePlan(plan.layers, tuple(sorted((*plan.dropped, full)))).validate(dims)
    # applied again to the dense model, the saved plan gives the same model
    again = tiny_model("llama-gqa", layers=6)
    flap_llm.apply_plan(again, result.plan.to_dict())
    assert again.config.num_hidden_layers == 4


def test_depth_model_heals(tmp_path):
    from flap_llm.healing.distill import HealConfig, heal
    model, _ = _depth("llama-gqa")
    teacher = tiny_model("llama-gqa", layers=6)
    out = heal(model, teacher, calibration(8, 16, seed=3), HealConfig(tokens=256, batch_size=4, lr=1e-3))
    assert out.tokens >= 256 and out.kl[-1] < out.kl[0]


def test_offload_is_refused_up_front(tmp_path):
    from flap_llm.workflow import check_prune
    with pytest.raises(FlapError, match="whole model in memory"):
        check_prune(None, flap_llm.PruneConfig(ratio=0.25, method="depth"), tmp_path / "o", offload=True)


# ---------------------------------------------------------------------------------------------
# GGUF: the family's own architecture

NATIVE_ARCH = {"llama-mha": "llama", "llama-gqa": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
               "gemma3": "gemma3", "phi3": "phi3", "granite": "granite"}


def _tokenized(arch: str):
    tok = tiny_tokenizer()
    model = tiny_model(arch, layers=6)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    flap_llm.prune(model, calibration(length=32), flap_llm.PruneConfig(ratio=0.34, method="depth"))
    return model, tok


def test_native_file_keys_and_tensors(tmp_path):
    model, tok = _tokenized("gemma3")
    fields, tensors = _read(save_gguf(model, tmp_path / "m.gguf", tok, "f32"))
    assert fields["general.architecture"] == "gemma3" and fields["gemma3.block_count"] == 4
    assert fields["gemma3.attention.sliding_window_pattern"] == [t == "sliding_attention"
                                                                 for t in model.config.layer_types]
    assert fields["gemma3.rope.freq_base_swa"] == 10000.0 and fields["gemma3.rope.freq_base"] == 1e6
    import numpy as np
    from test_gguf import _f32
    np.testing.assert_allclose(_f32(tensors["blk.0.post_ffw_norm.weight"]),
                               model.model.layers[0].post_feedforward_layernorm.weight.detach().numpy() + 1, rtol=1e-6)
    model, tok = _tokenized("granite")
    fields, _ = _read(save_gguf(model, tmp_path / "g.gguf", tok, "f32"))
    assert fields["general.architecture"] == "granite"
    assert (fields["granite.logit_scale"], fields["granite.residual_scale"]) == (2.0, 0.5)


def test_non_uniform_plans_of_deci_less_families_are_refused_before_pruning(tmp_path):
    from flap_llm.export.gguf_file import check_plan_exportable
    for arch in ("qwen3", "gemma3", "phi3", "granite"):
        model = tiny_model(arch)
        with pytest.raises(FlapError, match="method depth"):
            check_plan_exportable(model, flap_llm.PruneConfig(ratio=0.3))
        check_plan_exportable(model, flap_llm.PruneConfig(ratio=0.3, method="depth"))
    qwen3 = tiny_model("qwen3")
    flap_llm.prune(qwen3, calibration(), flap_llm.PruneConfig(ratio=0.3))
    with pytest.raises(FlapError, match="same widths in every layer"):
        save_gguf(qwen3, tmp_path / "q.gguf", tiny_tokenizer())
    assert not list(tmp_path.iterdir())


@needs_llama
@pytest.mark.parametrize("arch", ARCHS)
def test_llama_cpp_runs_depth_models_in_their_own_architecture(tmp_path, arch):
    model, tok = _tokenized(arch)
    for dtype, tol in (("f32", 0.005), ("f16", 0.01)):
        path = save_gguf(model, tmp_path / f"{dtype}.gguf", tok, dtype)
        assert _read(path)[0]["general.architecture"] == NATIVE_ARCH[arch]
        ours, theirs = _llama_vs_transformers(model, tok, path, tmp_path)
        assert theirs == pytest.approx(ours, rel=tol), (dtype, ours, theirs)
    if arch == "gemma3":  # the per-layer pattern matters: every layer global gives another number
        model.config.layer_types = ["full_attention"] * model.config.num_hidden_layers
        path = save_gguf(model, tmp_path / "global.gguf", tok, "f32")
        _, wrong = _llama_vs_transformers(model, tok, path, tmp_path)
        assert abs(wrong / theirs - 1) > 0.005


@needs_llama
def test_cli_depth_to_stock_checkpoint_and_gguf(tmp_path, text_file):
    model_dir = tiny_checkpoint(tmp_path / "model", "gemma3")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "flap_llm", "prune", "--model", str(model_dir), "--method", "depth",
                           "--ratio", "0.5", "--export", "hf-uniform", "--gguf", "f16", "--calib", str(text_file),
                           "--nsamples", "8", "--seqlen", "32", "--eval", str(text_file), "--eval-limit", "4",
                           "--eval-seqlen", "32", "--heal-tokens", "128", "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["params"]["decoder_removed_fraction"] == pytest.approx(0.5)
    assert len(report["layers"]["blocks_removed"]) == 1
    assert report["heal"]["tokens"] >= 128  # --heal-tokens works on a depth-pruned model unchanged
    # depth keeps every kept layer's widths: nothing for --gguf to align, and nothing said about it
    assert report["config"]["align"] is None and "aligning" not in proc.stdout + proc.stderr
    card = (out / "README.md").read_text()
    assert "Removed 1 of 2 decoder blocks whole" in card and "trust_remote_code" not in card
    assert 1 < report["gguf"]["llama_perplexity"] < 1e4  # measured by llama.cpp on the written file
    from transformers import AutoModelForCausalLM
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 1
    assert _read(out / "model-f16.gguf")[0]["general.architecture"] == "gemma3"
