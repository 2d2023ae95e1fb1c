"""--method depth on the real Gemma-3-270M (from its .gguf file), SmolLM2-135M and Qwen2.5-Coder-0.5B: the command
the issue names, its files run in llama.cpp in the family's own architecture, and llama-perplexity of the f16 file
within 1% of the same computation in transformers. Marked long (minutes on 2 cores each)."""

from __future__ import annotations

import json

import pytest

from flap_llm.calibration.data import bos_id, load_texts
from flap_llm.eval.evaluate import chunked_perplexity
from flap_llm.export import llamacpp

pytestmark = [pytest.mark.long,
              pytest.mark.skipif(llamacpp.bin_dir() is None, reason="llama.cpp's tools are not installed")]

N_CTX, CHUNKS = 256, 6
ARCH = {"gemma3-270m": "gemma3", "smollm2": "llama", "qwen0.5b": "qwen2"}


def _model_path(name: str) -> str | None:
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from common import MODELS
    try:
        return MODELS[name]()
    except Exception as e:  # the model packages are not installed
        pytest.skip(f"{name}: {e}")


@pytest.mark.parametrize("name", ["gemma3-270m", "smollm2", "qwen0.5b"])
def test_depth_runs_in_llama_cpp_and_agrees_with_transformers(tmp_path, name):
    """One command: a quarter of the blocks removed, the stock checkpoint and its f16 file; llama-quantize makes
    the Q4_K_M file from it as `--gguf Q4_K_M` does (tested on its own in test_gguf_quantize.py)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from test_gguf import _read
    from flap_llm.cli import main
    path = _model_path(name)
    out = tmp_path / "out"
    assert main(["prune", "--quiet", "--method", "depth", "--ratio", "0.25", "--nsamples", "8", "--no-eval",
                 "--device", "cpu", "--export", "hf-uniform", "--gguf", "f16", "--out", str(out)]
                + (["--model", path] if path else [])) == 0
    report = json.loads((out / "report.json").read_text())
    n = report["dense_shape"]["num_hidden_layers"]
    removed = report["layers"]["blocks_removed"]
    assert len(removed) == int(0.25 * n + 0.5)
    assert report["params"]["decoder_removed_fraction"] == pytest.approx(len(removed) / n)
    f16 = out / "model-f16.gguf"
    assert _read(f16)[0]["general.architecture"] == ARCH[name]
    model = AutoModelForCausalLM.from_pretrained(out).eval()  # the stock class, no remote code
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.num_hidden_layers == n - len(removed)
    text = tmp_path / "wiki.txt"
    text.write_text("\n\n".join(load_texts("builtin:wiki", "eval")[:40]))
    ids = tok(text.read_text(), add_special_tokens=False, return_tensors="pt").input_ids[0]
    ours = chunked_perplexity(model, ids, N_CTX, CHUNKS, bos=bos_id(tok))
    theirs = llamacpp.perplexity(f16, text, N_CTX, CHUNKS)
    assert theirs == pytest.approx(ours, rel=0.01), (ours, theirs)
    quant = llamacpp.quantize(f16, tmp_path / "q4.gguf", "Q4_K_M")
    assert _read(quant)[0]["general.architecture"] == ARCH[name]
    assert llamacpp.perplexity(quant, text, N_CTX, 2) < 1.5 * theirs
