"""--dry-run: the estimate reads only the config, writes nothing, grows with what costs memory, and agrees with
the peak RSS measured by benchmarks/peak_memory.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

import flap_llm
from flap_llm.cli import main
from flap_llm.reporting.estimate import heal_estimate, prune_estimate

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "peak_memory.jsonl"
SEVEN_B = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000)


def test_dry_run_reads_only_the_config_and_writes_nothing(tmp_path, capsys):
    folder = tmp_path / "config-only"  # no weights at all
    SEVEN_B.save_pretrained(folder)
    out = tmp_path / "out"
    assert main(["prune", "--model", str(folder), "--dry-run", "--json", "--method", "obs", "--offload",
                 "--nsamples", "64", "--out", str(out)]) == 0
    est = json.loads(capsys.readouterr().out)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["config-only"]
    assert est["peak_host_bytes"] == sum(est["parts"].values()) and est["peak_device_bytes"] == 0
    assert est["work"]["passes"] == {"forward": 3, "backward": 1}
    # streamed: the weights never whole (a 7B in fp32 is 25 GiB); what stays is the saved inputs of the Fisher's
    # windows at every layer, and every layer's two 4096 x 4096 Fisher matrices in float64 (8 GiB)
    assert "model weights" not in est["parts"]
    # of obs's two moments the larger is here the walk (a layer's covariances and greedy paths), not the Fisher
    # pass (the saved inputs of 32 layers x 16 windows: 256 MiB)
    assert "greedy paths of one layer" in est["parts"]
    assert "streamed Fisher: saved layer inputs (host)" not in est["parts"]
    assert est["parts"]["Fisher sums (every layer)"] == 32 * 2 * 4096 * 4096 * 8
    assert est["peak_host_bytes"] < 6.74e9 * 4  # less than the weights alone in memory


def test_streamed_obs_keeps_the_device_to_about_one_layer():
    # on a GPU the streamed Fisher moves each finished layer's sums to the host: the device holds the embeddings,
    # a layer read and one written, a batch's work and one layer's walk, not the 8 GiB of Fisher matrices
    est = prune_estimate(SEVEN_B, flap_llm.PruneConfig(ratio=0.2, method="obs"), nsamples=128, seqlen=128,
                         dtype=torch.bfloat16, device="cuda", offload=True)
    host_only = {"runtime (python, torch, tokenizer)", "streamed Fisher: saved layer inputs (host)",
                 "Fisher sums (every layer)"}
    assert est.peak_device_bytes == sum(b for name, b in est.parts.items() if name not in host_only)
    walk = est.parts["the walk: one layer's covariances"] + est.parts["greedy paths of one layer"]
    assert est.peak_device_bytes - walk < 2 * 2**30  # the embeddings, two layers, a batch's work
    assert est.peak_host_bytes >= est.parts["Fisher sums (every layer)"] == 32 * 2 * 4096 * 4096 * 8


def test_estimates_grow_with_what_costs_memory():
    base = dict(nsamples=128, seqlen=128, batch_size=8)
    flap = prune_estimate(SEVEN_B, flap_llm.PruneConfig(ratio=0.2), **base)
    assert flap.parts["model weights"] == pytest.approx(6.74e9 * 4, rel=0.01)  # Llama-2-7B in fp32
    lsq = prune_estimate(SEVEN_B, flap_llm.PruneConfig(ratio=0.2, compensation="lsq"), **base)
    obs = prune_estimate(SEVEN_B, flap_llm.PruneConfig(ratio=0.2, method="obs"), **base)
    assert flap.peak_host_bytes < lsq.peak_host_bytes < obs.peak_host_bytes
    streamed = prune_estimate(SEVEN_B, flap_llm.PruneConfig(ratio=0.2), offload=True, **base)
    assert streamed.peak_host_bytes < flap.peak_host_bytes / 4
    half = prune_estimate(SEVEN_B, flap_llm.PruneConfig(ratio=0.2), dtype=torch.bfloat16, **base)
    assert half.parts["model weights"] == flap.parts["model weights"] // 2
    one = heal_estimate(SEVEN_B, SEVEN_B, batch_size=8, seqlen=128)
    sharded = heal_estimate(SEVEN_B, SEVEN_B, batch_size=8, seqlen=128, world=4, shard=True)
    for part in ("trained weights", "their gradients", "AdamW state (two moments)"):
        assert sharded.parts[part] == pytest.approx(one.parts[part] / 4, rel=1e-6)
    lora = heal_estimate(SEVEN_B, SEVEN_B, batch_size=8, seqlen=128, method="lora")
    assert lora.parts["AdamW state (two moments)"] < one.parts["AdamW state (two moments)"] / 50
    teacher = "teacher weights (bf16 on a GPU)"
    assert one.parts[teacher] == pytest.approx(6.74e9 * 4, rel=0.01)  # on the CPU, the student's fp32
    gpu = heal_estimate(SEVEN_B, SEVEN_B, batch_size=8, seqlen=128, device="cuda")
    assert gpu.parts[teacher] == one.parts[teacher] // 2 and gpu.peak_device_bytes > 0


def test_dry_run_of_heal_names_the_processes(tmp_path, capsys, monkeypatch):
    from conftest import calibration, tiny_model
    dense = tmp_path / "dense"
    tiny_model().save_pretrained(dense)
    model = tiny_model()
    result = flap_llm.prune(model, calibration(), flap_llm.PruneConfig(ratio=0.5))
    flap_llm.save_pruned(model, tmp_path / "pruned", result=result)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["heal", "--model", str(tmp_path / "pruned"), "--teacher", str(dense), "--dry-run", "--json", "--shard",
                 "--out", str(tmp_path / "healed")]) == 0
    est = json.loads(capsys.readouterr().out)
    assert est["work"]["mode"] == "sharded (FSDP2)" and est["work"]["per-rank micro-batch"] == 4
    assert not (tmp_path / "healed").exists()


def _benchmark(name: str):
    import importlib
    import sys
    sys.path.insert(0, str(RESULTS.parents[1]))
    return importlib.import_module(name)


def test_estimates_agree_with_the_measured_peak_rss():
    """Within 25% of the peak RSS benchmarks/peak_memory.py measured (each run a fresh process), for FLAP and
    obs on SmolLM2 and Qwen2.5-Coder-0.5B, and obs --offload where measured."""
    peak_memory = _benchmark("peak_memory")
    rows = [json.loads(line) for line in RESULTS.read_text().splitlines()] if RESULTS.is_file() else []
    measured = {(r["model"], r["mode"]) for r in rows}
    assert {("smollm2", "flap"), ("smollm2", "obs"), ("qwen0.5b", "flap"), ("qwen0.5b", "obs")} <= measured, measured
    for r in rows:
        est = peak_memory.estimate_of(r)
        assert est.peak_host_bytes == pytest.approx(r["peak_rss_bytes"], rel=0.25), (r["model"], r["mode"],
                                                                                       est.parts)


def test_obs_estimates_agree_with_the_measured_scaling_rows():
    """Within 25% of the peak RSS of benchmarks/scaling.py's obs rows, random weights of real shapes up to
    Llama-2-7B's and Llama-3-8B's (11,008- and 14,336-wide MLPs, where the greedy paths dominate)."""
    scaling = _benchmark("scaling")
    rows = [r for r in scaling.current_rows() if r["method"].startswith("obs")]
    assert {r["shape"] for r in rows} >= {"smollm2-135m", "qwen2.5-0.5b", "llama-2-7b", "llama-3-8b"}
    for r in rows:
        est = scaling.dry_run(r)
        assert est.peak_host_bytes == pytest.approx(r["peak_rss_bytes"], rel=0.25), (r["shape"], r["method"], est.parts)
