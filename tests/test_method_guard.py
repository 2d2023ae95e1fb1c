"""The guard for every family we ship a real model of: at 50%, each method offered beyond the paper (FLAP + lsq,
obs) must leave a held-out perplexity no worse than plain FLAP's (bias compensation) on the same budget and
calibration windows. A method refused for a family must be refused up front. The baselines are exempt: they are
there to lose. Marked slow: minutes on 2 cores."""

from __future__ import annotations

import copy

import pytest

import flap_llm
from conftest import benchmark_module

pytestmark = pytest.mark.slow

# methods beyond the paper, as PruneConfig options
BEYOND_PAPER = {"flap + lsq": dict(compensation="lsq"), "obs": dict(method="obs")}
# model -> (calibration windows of 128 tokens, methods refused for its family)
MODELS = {"smollm2": (32, ()), "qwen0.5b": (32, ()), "gemma3-270m": (32, ("obs",))}


@pytest.mark.parametrize("name", list(MODELS))
def test_no_method_beyond_the_paper_loses_to_flap(name):
    from flap_llm.data import calibration_windows
    from flap_llm.evaluate import perplexity
    nsamples, refused = MODELS[name]
    model, tok, _ = benchmark_module("common").load(name)
    calib = calibration_windows("builtin:wiki", tok, nsamples, 128, 0)

    def ppl(**options) -> float:
        m = copy.deepcopy(model)
        flap_llm.prune(m, calib, flap_llm.PruneConfig(ratio=0.5, **options), batch_size=16)
        return perplexity(m, tok, "builtin:wiki", 128, 16, limit=16)["ppl"]

    flap = ppl()
    for method, options in BEYOND_PAPER.items():
        if method in refused:
            with pytest.raises(flap_llm.FlapError, match="not offered"):
                flap_llm.prune(copy.deepcopy(model), calib, flap_llm.PruneConfig(ratio=0.5, **options))
            continue
        beyond = ppl(**options)
        assert beyond <= flap, f"{method} leaves perplexity {beyond:.2f} on {name} at 50%, plain FLAP {flap:.2f}"
