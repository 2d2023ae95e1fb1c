"""Bad input raises FlapError with a useful message and leaves the model untouched."""

from __future__ import annotations


import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import flap_llm
from flap_llm import FlapError, PruneConfig
from conftest import VOCAB, calibration, tiny_model


@pytest.mark.parametrize("kwargs, words", [
    (dict(ratio=1.0), "ratio"), (dict(ratio=-0.1), "ratio"), (dict(ratio="0.2"), "ratio"),
    (dict(method="sparsegpt"), "method"), (dict(metric="L2"), "metric"), (dict(structure="XX"), "structure"),
    (dict(compensation="magic"), "compensation"), (dict(mode="zero"), "mode"),
    (dict(structure="UL-MM"), "remove_heads"), (dict(structure="AL-MM"), "remove_heads"),
    (dict(structure="AL-MM", remove_heads=-1), "remove_heads"),
])
def test_bad_config(kwargs, words):
    with pytest.raises(FlapError, match=words):
        PruneConfig(**kwargs)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_untouched(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k in before:
        assert torch.equal(after[k], before[k]), k
    assert not hasattr(model.config, "flap_layers")


@pytest.mark.parametrize("calib, words", [
    (torch.rand(4, 8), "integer"),
    (torch.randint(0, VOCAB, (8,)), "shape"),
    (torch.randint(0, VOCAB, (2, 2, 2)), "shape"),
    (torch.zeros(0, 8, dtype=torch.long), "empty"),
    ([], "empty"),
    (torch.full((2, 8), VOCAB), "vocabulary"),
    (torch.full((2, 8), -1), "vocabulary"),
    ([torch.randint(0, VOCAB, (2, 8)), torch.randint(0, VOCAB, (2, 9))], "same length"),
    (None, "needs calibration"),
    ("some text", "integer"),
])
def test_bad_calibration(calib, words):
    model = tiny_model()
    before = _state(model)
    with pytest.raises(FlapError, match=words):
        flap_llm.prune(model, calib, PruneConfig())
    _assert_untouched(model, before)


def test_remove_heads_larger_than_model():
    model = tiny_model("llama-gqa")
    before = _state(model)
    with pytest.raises(FlapError, match="only 4 KV groups"):
        flap_llm.prune(model, calibration(), PruneConfig(structure="AL-MM", remove_heads=5))
    _assert_untouched(model, before)


def test_unsupported_architecture_lists_supported():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=VOCAB))
    with pytest.raises(FlapError, match="LlamaForCausalLM.*MistralForCausalLM.*Qwen2ForCausalLM.*Qwen3ForCausalLM"):
        flap_llm.prune(model, calibration(), PruneConfig())


@pytest.mark.parametrize("method", ["flap", "wanda-sp"])
def test_nan_activations_leave_model_untouched(method):
    model = tiny_model("llama-gqa", layers=3)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("inf")
    before = _state(model)
    with pytest.raises(FlapError, match="NaN or inf.*layer 1"):
        flap_llm.prune(model, calibration(), PruneConfig(method=method))
    _assert_untouched(model, before)


def test_pruning_twice_is_refused():
    model = tiny_model()
    flap_llm.prune(model, calibration(), PruneConfig(ratio=0.3))
    with pytest.raises(FlapError, match="already pruned"):
        flap_llm.prune(model, calibration(), PruneConfig(ratio=0.3))
