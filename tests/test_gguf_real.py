"""The GGUF export of the real SmolLM2-135M, run in llama.cpp: tokenization, perplexity against the same
computation in transformers (FLAP 50%, AL-AM), greedy generation. Marked slow. (Qwen2's biases, the emptied
layers, the rope scalings and the SentencePiece vocabularies are checked on tiny models in test_gguf.py; the Qwen
rows of BENCHMARKS.md's GGUF table were measured the same way.)"""

from __future__ import annotations

import copy

import pytest

import flap_llm
from flap_llm.export import llamacpp
from flap_llm.calibration.data import calibration_windows, load_texts
from flap_llm.eval.evaluate import chunked_perplexity
from test_gguf import greedy_agrees

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(llamacpp.bin_dir() is None, reason="llama.cpp's tools are not installed")]

N_CTX, CHUNKS = 256, 6


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    from flap_llm.model.models import load_model
    model, tok, _ = load_model(None, progress=False)
    work = tmp_path_factory.mktemp("smollm2")
    text = work / "wiki.txt"
    text.write_text("\n\n".join(load_texts("builtin:wiki", "eval")[:40]))
    calib = calibration_windows("builtin:wiki", tok, 32, 128, 0)
    return "smollm2", model, tok, text, calib, work


def test_tokenization_equals_transformers(family):
    name, model, tok, text, _, work = family
    path = flap_llm.save_gguf(model, work / "dense-f16.gguf", tok, "f16", overwrite=True)
    ids = tok(text.read_text(), add_special_tokens=False).input_ids
    assert len(ids) > 2000
    assert llamacpp.tokenize(path, text) == ids


def test_perplexity_equals_transformers(family):
    name, dense, tok, text, calib, work = family
    model, ratio = copy.deepcopy(dense), 0.5
    flap_llm.prune(model, calib, flap_llm.PruneConfig(ratio=ratio), batch_size=16)
    widths = {layer.mlp.gate_proj.out_features for layer in model.model.layers}
    assert len(widths) > 1  # AL-AM: layers keep different widths
    ids = tok(text.read_text(), add_special_tokens=False, return_tensors="pt").input_ids[0]
    ours = chunked_perplexity(model, ids, N_CTX, CHUNKS)
    for dtype, tol in (("f32", 0.005), ("f16", 0.01)):
        path = flap_llm.save_gguf(model, work / f"{ratio}-{dtype}.gguf", tok, dtype, overwrite=True)
        theirs = llamacpp.perplexity(path, text, N_CTX, CHUNKS)
        assert theirs == pytest.approx(ours, rel=tol), (name, ratio, dtype, ours, theirs)
        path.unlink()


def test_greedy_generation_matches(family):
    name, dense, tok, _, calib, work = family
    model = copy.deepcopy(dense)
    flap_llm.prune(model, calib, flap_llm.PruneConfig(ratio=0.2), batch_size=16)
    path = flap_llm.save_gguf(model, work / "gen-f32.gguf", tok, "f32", overwrite=True)
    prompt = "The history of the city begins"
    text = llamacpp.complete(path, prompt, 24)
    agrees, gap = greedy_agrees(model, tok, prompt, text, 24)
    assert agrees or gap < 0.05, (text, gap)
