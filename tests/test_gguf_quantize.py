"""One command to the file people deploy: `--gguf Q4_K_M` (and `export --dtype`) run llama.cpp's llama-quantize on
our f16 export, align the MLP widths for the type, and report the file's size and llama.cpp's perplexity."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from flap_llm import FlapError
from flap_llm.export import llamacpp
from flap_llm.cli import main
from flap_llm.export import gguf_alignment, gguf_type
from conftest import tiny_tokenizer

needs_tools = pytest.mark.skipif(llamacpp.bin_dir() is None, reason="llama.cpp's tools are not installed")


def test_types_any_case_and_their_alignment():
    assert [gguf_type(t) for t in ("q4_k_m", "Q4_K_M", "F16", "q8_0", "Q8_0", "q6_k", "Q4_0")] == \
        ["Q4_K_M", "Q4_K_M", "f16", "q8_0", "q8_0", "Q6_K", "Q4_0"]
    assert [gguf_alignment(t) for t in ("Q4_K_M", "q6_k", "Q5_K_M", "Q4_0", "Q8_0", "f16", "f32", "bf16")] == \
        [256, 256, 256, 32, 32, 32, None, None]
    with pytest.raises(FlapError, match="unknown GGUF type 'Q4_K_X'.*Q4_K_M"):
        gguf_type("Q4_K_X")


@pytest.fixture(scope="module")
def wide_model_dir(tmp_path_factory):
    """A tiny Llama whose rows are wide enough for k-quants (hidden 256, MLP 768)."""
    folder = tmp_path_factory.mktemp("wide") / "model"
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=768,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         head_dim=64, max_position_embeddings=256))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.05)
    model.config.architectures = ["LlamaForCausalLM"]
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@needs_tools
def test_prune_to_q4_k_m_in_one_command(tmp_path, wide_model_dir, text_file):
    import gguf
    out = tmp_path / "out"
    rc = main(["prune", "--quiet", "--model", str(wide_model_dir), "--calib", str(text_file), "--eval", str(text_file),
               "--nsamples", "8", "--seqlen", "32", "--eval-seqlen", "32", "--eval-limit", "4", "--ratio", "0.3",
               "--gguf", "q4_k_m", "--out", str(out)])
    assert rc == 0
    path = out / "model-Q4_K_M.gguf"
    report = json.loads((out / "report.json").read_text())
    # the MLP widths were aligned for the k-quant's 256-value super-blocks
    assert report["config"]["align"] == 256
    assert all(layer["channels"] % 256 == 0 for layer in report["layers"]["per_layer"])
    assert report["gguf"]["type"] == "Q4_K_M" and report["gguf"]["bytes"] == path.stat().st_size
    assert 1 < report["gguf"]["llama_perplexity"] < 1e4
    assert "llama.cpp perplexity" in (out / "report.md").read_text()
    card = (out / "README.md").read_text()  # the model card says how to run the file and what it measured
    assert "llama-cli -m out/model-Q4_K_M.gguf" in card
    assert f"| llama.cpp perplexity of the GGUF ({text_file}, llama-perplexity) |  | " \
        f"{report['gguf']['llama_perplexity']:.2f} |" in card
    # every ffn_down row takes a k-quant (Q4_K_M gives some of them Q6_K), none falls back
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    downs = [v for k, v in types.items() if k.endswith("ffn_down.weight")]
    assert downs and set(downs) <= {"Q4_K", "Q6_K"}, types
    assert not [p for p in out.iterdir() if p.name.endswith(".f16.gguf")] and not list(tmp_path.glob(".out*"))


@needs_tools
def test_export_quantizes_and_an_explicit_align_wins(tmp_path, wide_model_dir, text_file):
    import gguf
    assert main(["export", "--quiet", "--model", str(wide_model_dir), "--dtype", "Q4_0",
                 "--out", str(tmp_path / "m.gguf")]) == 0
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}
    assert types["blk.0.ffn_down.weight"] == "Q4_0"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt", "m.gguf"]
    out = tmp_path / "out"
    assert main(["prune", "--quiet", "--model", str(wide_model_dir), "--calib", str(text_file), "--no-eval",
                 "--nsamples", "8", "--seqlen", "32", "--gguf", "Q6_K", "--align", "64", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["align"] == 64 and report["gguf"]["llama_perplexity"] is None


def test_without_llama_cpp_a_quantized_type_is_refused_before_any_work(tmp_path, model_dir, text_file, capsys,
                                                                      monkeypatch):
    monkeypatch.setenv("FLAP_LLAMA_CPP_BIN", str(tmp_path))  # a folder without the tools

    def forbidden(*a, **k):
        raise AssertionError("work started before the refusal")
    monkeypatch.setattr("flap_llm.model.models.load_model", forbidden)
    for argv in (["prune", "--quiet", "--model", str(model_dir), "--calib", str(text_file), "--gguf", "Q4_K_M",
                  "--out", str(tmp_path / "out")],
                 ["export", "--quiet", "--model", str(model_dir), "--dtype", "q4_k_m", "--out", str(tmp_path / "m.gguf")]):
        rc = main(argv)
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1, err
        assert "llama-quantize is not installed" in err and "pip install 'flap-llm[llama]'" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt"]
