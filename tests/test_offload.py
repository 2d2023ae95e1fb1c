"""Layer streaming (--offload): the same pruned model as in memory, written layer by layer."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import flap_llm
from flap_llm import FlapError
from flap_llm.calibration.offload import prune_offloaded
from conftest import ARCHS, calibration, tiny_model


CONFIGS = [dict(ratio=0.5), dict(ratio=0.5, compensation="lsq"), dict(ratio=0.5, method="wanda-sp"),
           dict(ratio=0.4, method="mag-sp"), dict(ratio=0.9), dict(ratio=0.5, method="obs"),
           dict(ratio=0.5, method="obs", allocation="measured")]


# every family with the default method and with obs (its Fisher streamed); the other methods on three families
# (not obs on Gemma 3, which refuses it)
@pytest.mark.parametrize("arch, cfg", [(a, c) for a in ARCHS for c in (CONFIGS[0], CONFIGS[5]) if
                                       not (a == "gemma3" and c.get("method") == "obs")] +
                         [(a, c) for a in ("llama-gqa", "qwen2", "gemma3") for c in CONFIGS[1:5]] +
                         [("qwen2", CONFIGS[6])])
def test_offloaded_equals_in_memory(tmp_path, arch, cfg):
    src = tmp_path / "src"
    tiny_model(arch, layers=3).save_pretrained(src, max_shard_size="20KB")  # several source shards
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    ids = calibration()
    ref = AutoModelForCausalLM.from_pretrained(src)
    ref_result = flap_llm.prune(ref, ids, flap_llm.PruneConfig(**cfg), batch_size=4)
    result = prune_offloaded(src, ids, flap_llm.PruneConfig(**cfg), tmp_path / "out", batch_size=4)
    assert result.plan == ref_result.plan
    assert result.report["params"] == ref_result.report["params"]
    loaded = flap_llm.load_pruned(tmp_path / "out")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before  # the source is only read
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 4  # written layer by layer
    # a layer in memory at a time: the largest loaded state is one decoder layer
    layer_bytes = sum(p.numel() * 4 for p in tiny_model(arch).model.layers[0].parameters())
    assert result.report["offload"]["peak_layer_bytes"] == layer_bytes


def test_offload_refuses_bad_sources(tmp_path):
    with pytest.raises(FlapError, match="config.json"):
        prune_offloaded(tmp_path, calibration(), flap_llm.PruneConfig(), tmp_path / "o")
    src = tmp_path / "src"
    tiny_model().save_pretrained(src)
    with pytest.raises(FlapError, match="source model"):
        prune_offloaded(src, calibration(), flap_llm.PruneConfig(), src, overwrite=True)
    with pytest.raises(FlapError, match="vocabulary"):
        prune_offloaded(src, torch.full((2, 8), 10_000), flap_llm.PruneConfig(), tmp_path / "o")
    gemma = tmp_path / "gemma"
    tiny_model("gemma3").save_pretrained(gemma)
    with pytest.raises(FlapError, match="not offered"):  # before any weight is read
        prune_offloaded(gemma, calibration(), flap_llm.PruneConfig(method="obs"), tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_offload_writes_the_format_asked_for_and_checks_it_before_the_walk(tmp_path, text_file, capsys):
    """`--offload --export vllm`: a family vLLM can't take (Qwen3) is refused before any layer is read, nothing
    written; a Llama is written in format vllm (the flap folder), which load_pruned reads back."""
    from conftest import tiny_checkpoint
    from flap_llm.cli import main
    args = ["--offload", "--export", "vllm", "--calib", str(text_file), "--nsamples", "8", "--seqlen", "16",
            "--quiet", "--no-eval"]
    qwen3 = tiny_checkpoint(tmp_path / "qwen3", "qwen3")
    capsys.readouterr()
    assert main(["prune", "--model", str(qwen3), "--out", str(tmp_path / "q"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "q_norm/k_norm" in err[0], err
    assert not (tmp_path / "q").exists()
    llama = tiny_checkpoint(tmp_path / "llama", "llama-gqa")
    assert main(["prune", "--model", str(llama), "--out", str(tmp_path / "l"), *args]) == 0
    assert json.loads((tmp_path / "l" / "flap_manifest.json").read_text())["format"] == "vllm"
    assert flap_llm.load_pruned(tmp_path / "l").config.flap_layers
