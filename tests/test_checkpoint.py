"""Pruned checkpoints reload in one call, in a fresh process, and in stock transformers."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import flap_llm
from flap_llm import FlapError
from flap_llm.model.checkpoint import MANIFEST, load_pruned, save_pruned
from flap_llm.model.plan import LayerPlan, PrunePlan
from conftest import ARCHS, calibration, tiny_model

ROOT = Path(__file__).resolve().parents[1]


def _pruned(arch: str, **cfg):
    model = tiny_model(arch)
    result = flap_llm.prune(model, calibration(), flap_llm.PruneConfig(**{"ratio": 0.5, **cfg}))
    return model, result


def _no_attention_model():
    from flap_llm.model.apply import LayerUpdate, OutputUpdate
    model = tiny_model("llama-gqa")
    plan = PrunePlan((LayerPlan((), (), tuple(range(0, 96, 3))), LayerPlan((0, 1), (0,), tuple(range(50)))))
    # the emptied attention carries a compensation-like bias
    updates = [LayerUpdate(OutputUpdate(bias=torch.randn(64, dtype=torch.float64)), OutputUpdate()),
               LayerUpdate(OutputUpdate(), OutputUpdate())]
    flap_llm.apply_plan(model, plan, updates)
    return model


CASES = {
    "llama-mha": lambda: _pruned("llama-mha"),
    "llama-gqa": lambda: _pruned("llama-gqa"),
    "qwen2": lambda: _pruned("qwen2"),
    "mistral": lambda: _pruned("mistral"),
    "qwen3": lambda: _pruned("qwen3"),
    "gemma3": lambda: _pruned("gemma3", ratio=0.6),
    "phi3": lambda: _pruned("phi3", ratio=0.6),
    "no-attention-layer": lambda: (_no_attention_model(), None),
}

RUN_LOADED = textwrap.dedent("""
    import sys, torch
    path, ids_file, out_file, mode = sys.argv[1:5]
    if mode == "stock":
        class Block:
            def find_spec(self, name, *args):
                if name.split(".")[0] == "flap_llm":
                    raise ImportError("flap_llm is blocked in this process")
        sys.meta_path.insert(0, Block())
        try:
            import flap_llm
            raise SystemExit("flap_llm should not be importable here")
        except ImportError:
            pass
        from transformers import AutoModelForCausalLM
    else:
        import flap_llm
    ids = torch.load(ids_file)
    for folder in path.split(","):  # every checkpoint in this one fresh process
        if mode == "stock":
            model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
            assert "flap_llm" not in sys.modules
        else:
            model = flap_llm.load_pruned(folder)
        with torch.no_grad():
            logits = model(ids).logits
        gen = model.generate(ids[:1, :4], attention_mask=torch.ones(1, 4, dtype=torch.long), max_new_tokens=4,
                             do_sample=False, pad_token_id=0)
        torch.save({"logits": logits, "gen": gen}, folder + "." + out_file)
""")


def _run_loaded(tmp_path: Path, ckpts: list[Path], ids: torch.Tensor, mode: str) -> list[dict]:
    """Logits and greedy tokens of each checkpoint, loaded in one fresh process."""
    torch.save(ids, tmp_path / "ids.pt")
    script = tmp_path / "run.py"
    script.write_text(RUN_LOADED)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(script), ",".join(map(str, ckpts)), str(tmp_path / "ids.pt"), "out.pt",
                           mode], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(f"{c}.out.pt") for c in ckpts]


@pytest.mark.parametrize("mode", ["flap_llm", "stock"])
def test_fresh_process_reload_gives_same_logits(tmp_path, mode):
    """Every case's checkpoint, reloaded in a fresh process (by flap_llm, or by stock transformers with flap_llm
    blocked), gives the pruned model's logits and greedy tokens."""
    models, ckpts = {}, []
    for case, make in CASES.items():
        models[case], result = make()
        ckpts.append(save_pruned(models[case], tmp_path / case, result=result))
    ids = calibration(n=3, length=10)
    for (case, model), out in zip(models.items(), _run_loaded(tmp_path, ckpts, ids, mode)):
        with torch.no_grad():
            want = model(ids).logits
        torch.testing.assert_close(out["logits"], want, rtol=1e-6, atol=1e-6, msg=case)
        gen = model.generate(ids[:1, :4], attention_mask=torch.ones(1, 4, dtype=torch.long), max_new_tokens=4,
                             do_sample=False, pad_token_id=0)
        assert torch.equal(out["gen"], gen), case


def test_manifest_contents(tmp_path):
    model, result = _pruned("llama-gqa")
    save_pruned(model, tmp_path / "ck", result=result, extra={"seed": 7, "calibration": {"source": "test"}})
    manifest = json.loads((tmp_path / "ck" / MANIFEST).read_text())
    assert manifest["format"] == "flap" and manifest["format_version"] == 1
    assert manifest["plan"] == result.plan.to_dict()
    assert manifest["prune_config"]["ratio"] == 0.5
    assert manifest["parameters"] == sum(p.numel() for p in model.parameters())
    assert manifest["seed"] == 7 and manifest["calibration"] == {"source": "test"}
    assert {"torch", "transformers", "flap-llm"} <= set(manifest["versions"])
    assert (tmp_path / "ck" / "modeling_flap.py").is_file()
    assert list((tmp_path / "ck").glob("*.safetensors"))


def test_base_model_sha256_recorded(tmp_path):
    dense = tiny_model("llama-gqa")
    dense.save_pretrained(tmp_path / "dense")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    result = flap_llm.prune(model, calibration(), flap_llm.PruneConfig(ratio=0.3))
    save_pruned(model, tmp_path / "out", result=result)
    base = json.loads((tmp_path / "out" / MANIFEST).read_text())["base_model"]
    import hashlib
    want = hashlib.sha256((tmp_path / "dense" / "model.safetensors").read_bytes()).hexdigest()
    assert base["sha256"] == {"model.safetensors": want}
    # the source folder can never be the destination, even with overwrite
    with pytest.raises(FlapError, match="source model"):
        save_pruned(model, tmp_path / "dense", result=result, overwrite=True)


@pytest.mark.parametrize("arch", ARCHS)
def test_hf_uniform_loads_in_stock_transformers(tmp_path, arch):
    compensation = "none" if arch in ("qwen3", "gemma3", "phi3") else "bias"  # their stock MLPs have no bias
    model, result = _pruned(arch, structure="UL-UM", compensation=compensation)
    ckpt = save_pruned(model, tmp_path / "u", result=result, format="hf-uniform")
    cfg = json.loads((ckpt / "config.json").read_text())
    assert "auto_map" not in cfg and not (ckpt / "modeling_flap.py").exists()
    stock = AutoModelForCausalLM.from_pretrained(ckpt)
    assert type(stock).__module__.startswith("transformers.")
    ids = calibration(n=3, length=10)
    with torch.no_grad():
        torch.testing.assert_close(stock(ids).logits, model(ids).logits, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(load_pruned(ckpt)(ids).logits, model(ids).logits, rtol=1e-6, atol=1e-6)


def test_hf_uniform_refuses_non_uniform_plans(tmp_path):
    model, result = _pruned("llama-gqa", ratio=0.6)
    assert len({(c["heads"], c["channels"]) for c in result.plan.kept_counts()}) > 1
    with pytest.raises(FlapError, match="not uniform"):
        save_pruned(model, tmp_path / "u", result=result, format="hf-uniform")
    assert not (tmp_path / "u").exists()
    with pytest.raises(FlapError, match="format"):
        save_pruned(model, tmp_path / "u", result=result, format="pickle")


def test_hf_uniform_refuses_head_counts_stock_transformers_cannot_hold(tmp_path):
    """8 heads -> 6 with hidden 64: a uniform plan, but transformers validates hidden % heads == 0."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=8, num_key_value_heads=8, head_dim=8)).eval()
    result = flap_llm.prune(model, calibration(), flap_llm.PruneConfig(ratio=0.25, structure="UL-MM", remove_heads=4))
    assert [c["heads"] for c in result.plan.kept_counts()] == [6, 6]
    with pytest.raises(FlapError, match="format='flap' or export a GGUF"):
        save_pruned(model, tmp_path / "u", result=result, format="hf-uniform")
    assert list(tmp_path.iterdir()) == []
    save_pruned(model, tmp_path / "f", result=result)  # the flap format holds it
    assert load_pruned(tmp_path / "f").model.layers[0].self_attn.q_proj.out_features == 48


def test_refuses_non_empty_destination_and_overwrites_only_when_complete(tmp_path):
    model, result = _pruned("llama-gqa")
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "keep.txt").write_text("user data")
    with pytest.raises(FlapError, match="not empty"):
        save_pruned(model, dest, result=result)
    assert (dest / "keep.txt").read_text() == "user data"
    save_pruned(model, dest, result=result, overwrite=True)
    assert not (dest / "keep.txt").exists() and (dest / MANIFEST).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    model, result = _pruned("llama-gqa")
    save_pruned(model, tmp_path / "out", result=result)
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}

    def boom(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr("flap_llm.model.checkpoint.write_json", boom)
    with pytest.raises(OSError, match="simulated"):
        save_pruned(model, tmp_path / "out", result=result, overwrite=True)
    with pytest.raises(OSError, match="simulated"):
        save_pruned(model, tmp_path / "new", result=result)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no partial folder, no stray temp
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before


def test_corrupted_checkpoints_give_clear_errors(tmp_path):
    model, result = _pruned("llama-gqa")
    good = save_pruned(model, tmp_path / "good", result=result)
    import shutil

    def variant(name, fn):
        d = tmp_path / name
        shutil.copytree(good, d)
        fn(d)
        return d

    weights = next(good.glob("*.safetensors")).name
    truncated = variant("trunc", lambda d: (d / weights).write_bytes((d / weights).read_bytes()[:5000]))
    with pytest.raises(FlapError, match="truncated or corrupted"):
        load_pruned(truncated)
    no_weights = variant("nowt", lambda d: (d / weights).unlink())
    with pytest.raises(FlapError, match="incomplete"):
        load_pruned(no_weights)

    def bump(d):
        m = json.loads((d / MANIFEST).read_text())
        m["format_version"] = 99
        (d / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(FlapError, match="format version 99"):
        load_pruned(variant("v99", bump))
    with pytest.raises(FlapError, match="corrupted"):
        load_pruned(variant("badjson", lambda d: (d / MANIFEST).write_text("{not json")))
    with pytest.raises(FlapError, match="no flap_manifest.json"):
        load_pruned(variant("nomanifest", lambda d: (d / MANIFEST).unlink()))
    with pytest.raises(FlapError, match="no checkpoint folder"):
        load_pruned(tmp_path / "missing")


def test_load_pruned_dtype_and_device(tmp_path):
    model, result = _pruned("qwen2")
    ckpt = save_pruned(model, tmp_path / "ck", result=result)
    half = load_pruned(ckpt, dtype=torch.bfloat16, device="cpu")
    assert next(half.parameters()).dtype == torch.bfloat16
    assert half.model.layers[0].self_attn.o_proj.bias.dtype == torch.bfloat16


@pytest.mark.parametrize("arch", ["llama-gqa", "phi3"])
def test_a_saved_plan_is_data_and_applies_again(tmp_path, arch):
    """The plan in a checkpoint's manifest, applied to the dense model with apply_plan, gives the same model
    (without compensation directly; with FLAP's bias from the dense statistics)."""
    from flap_llm.model.arch import dims_of, spec_of
    from flap_llm.methods.flap import bias_updates
    ids = calibration(n=3, length=10)
    for compensation in ("none", "bias"):
        model, result = _pruned(arch, compensation=compensation)
        ckpt = save_pruned(model, tmp_path / compensation, result=result)
        plan = json.loads((ckpt / MANIFEST).read_text())["plan"]
        dense = tiny_model(arch)
        updates = None if compensation == "none" else bias_updates(dense, spec_of(dense), dims_of(dense),
                                                                    flap_llm.PrunePlan.from_dict(plan), result.stats)
        flap_llm.apply_plan(dense, plan, updates)
        with torch.no_grad():
            torch.testing.assert_close(dense(ids).logits, model(ids).logits, rtol=0, atol=0)
            torch.testing.assert_close(load_pruned(ckpt)(ids).logits, model(ids).logits, rtol=1e-6, atol=1e-6)
        with pytest.raises(FlapError, match="already pruned"):
            flap_llm.apply_plan(dense, plan)
    with pytest.raises(FlapError, match="updates has 1 entries"):
        flap_llm.apply_plan(tiny_model(arch), plan, updates[:1])


def test_hf_uniform_refuses_a_window_the_stock_target_would_drop(tmp_path):
    """Mistral's window applies whenever set; a biased LLaMA would attend to everything instead."""
    model, result = _pruned("mistral", structure="UL-UM")
    model.config.sliding_window = 8
    with pytest.raises(FlapError, match="sliding window"):
        save_pruned(model, tmp_path / "u", result=result, format="hf-uniform")
    model.config.sliding_window = None
    save_pruned(model, tmp_path / "u", result=result, format="hf-uniform")


def test_a_checkpoint_written_by_0_1_loads_and_its_plan_applies_again(tmp_path):
    """0.1 saved its config flat, obs's options on every run: such a checkpoint still loads with the same outputs,
    its config reads back as the method's options, and its plan applies again to the dense model."""
    from flap_llm.model.checkpoint import MANIFEST
    model = tiny_model("llama-gqa")
    dense = copy.deepcopy(model)
    result = flap_llm.prune(model, calibration(), flap_llm.PruneConfig(ratio=0.4, compensation="lsq"))
    flap_llm.save_pruned(model, tmp_path / "old", result=result)
    manifest = json.loads((tmp_path / "old" / MANIFEST).read_text())
    manifest["prune_config"] = {"ratio": 0.4, "method": "flap", "metric": "WIFV", "structure": "AL-AM",
                                "remove_heads": None, "compensation": "lsq", "mode": "prune", "lsq_damp": 0.01,
                                "sequential": False, "align": None, "selection": "obs", "allocation": "held-out",
                                "fisher_fraction": None, "select_damp": None, "token_windows": None,
                                "token_shrink": None, "token_reference": None}
    (tmp_path / "old" / MANIFEST).write_text(json.dumps(manifest))
    ids = calibration(3, 16, seed=5)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, flap_llm.load_pruned(tmp_path / "old")(ids).logits)
    assert flap_llm.PruneConfig.from_dict(manifest["prune_config"]) == result.config
    flap_llm.apply_plan(dense, manifest["plan"])
    assert [len(layer.mlp.down_proj.weight[0]) for layer in dense.model.layers] == \
        [len(lp["channels"]) for lp in manifest["plan"]["layers"]]
