"""The library's one-command path (workflow.prune_model), and a method added in one module: registered from
the test, it runs through PruneConfig, the command line (its flags in --help), the dry run and the report, with
no other file changed."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

import flap_llm
from conftest import tiny_model
from flap_llm.cli import main
from flap_llm.methods import Method, Options, option, register, unregister
from flap_llm.workflow import Calibration, Evaluation, prune_model


def test_prune_heal_and_q4_k_m_in_one_call(tmp_path, model_dir, text_file):
    """prune_model: prune, heal on 256 tokens, evaluate, save, export Q4_K_M (llama.cpp measures it) and write
    the card, in one call."""
    from flap_llm.export.llamacpp import bin_dir
    if bin_dir() is None:
        pytest.skip("llama.cpp's tools are not installed")
    out = tmp_path / "out"
    report = prune_model(str(model_dir), flap_llm.PruneConfig(ratio=0.3), out,
                         calibration=Calibration(str(text_file), 8, 16),
                         evaluation=Evaluation(text=str(text_file), seqlen=16, limit=4), heal_tokens=256,
                         gguf="q4_k_m", log=None, progress=False)
    assert 1 < report["perplexity"]["ppl_before"] < 1e4 and 1 < report["perplexity"]["ppl_after"] < 1e4
    heal = report["heal"]
    assert heal["tokens"] == 256 and len(heal["loss"]) == 2 and heal["ppl_before_heal"] > 0
    assert report["gguf"]["type"] == "Q4_K_M" and report["gguf"]["llama_perplexity"] > 1
    assert (out / "model-Q4_K_M.gguf").stat().st_size == report["gguf"]["bytes"]
    for name in ("report.json", "report.md", "plan.png", "README.md", "flap_manifest.json", "model.safetensors"):
        assert (out / name).is_file(), name
    assert json.loads((out / "report.json").read_text())["heal"]["tokens"] == 256
    assert 0.25 < report["params"]["decoder_removed_fraction"] < 0.35
    reloaded = flap_llm.load_pruned(out)
    assert sum(p.numel() for p in reloaded.parameters()) == json.loads((out / "flap_manifest.json").read_text())[
        "parameters"]


def test_prune_model_checks_everything_before_loading(tmp_path, model_dir, monkeypatch):
    monkeypatch.setattr("flap_llm.model.models.load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    for kwargs, words in ((dict(out=tmp_path / "full"), "not empty"), (dict(heal_tokens=0), "--heal-tokens"),
                          (dict(export="nope"), "unknown checkpoint format"), (dict(gguf="Q9_X"), "Q9_X"),
                          (dict(offload=True, gguf="f16"), "--gguf needs")):
        with pytest.raises(flap_llm.FlapError, match=words):
            prune_model(str(model_dir), flap_llm.PruneConfig(), **{"out": tmp_path / "o", **kwargs}, log=None)


# A method of a test's own: keeps the first channels and KV groups of every layer, scoring nothing.
@dataclass(frozen=True)
class FirstOptions(Options):
    side: str = option("front", choices=("front", "back"), help="keep the first units (front) or the last (back)")
    heads: bool | None = option(help="also remove KV groups")


class KeepFirst(Method):
    name = "keep-first"
    summary = "a test's method: keeps the first units"
    options = FirstOptions
    needs_data = False
    refused = {"Gemma3ForCausalLM": "a test refuses Gemma 3"}
    instead = "use another method"

    def run(self, job, statistics):
        from flap_llm.model.plan import PrunePlan
        d, o = job.dims, job.config.options
        n_ch = d.d_ff - int(job.config.ratio * d.d_ff)
        n_kv = d.n_kv_heads - (int(job.config.ratio * d.n_kv_heads) if o.heads else 0)
        pick = (lambda n, k: range(k)) if o.side == "front" else (lambda n, k: range(n - k, n))
        groups = [pick(d.n_kv_heads, n_kv)] * d.n_layers
        plan = PrunePlan.from_groups([list(g) for g in groups], [list(pick(d.d_ff, n_ch))] * d.n_layers, d)
        job.apply(plan, None)
        return plan, None

    def label(self, options):
        return f"keep-first, {options.side}"

    def uniform(self, options):
        return True

    def cost(self, inputs, options):
        from flap_llm.reporting.estimate import Cost
        return Cost(parts={"keep-first's scratch": 12345 * inputs.shapes.n_layers}, forward=0)


@pytest.fixture
def keep_first():
    method = register(KeepFirst())
    yield method
    unregister(method.name)


def test_a_method_added_in_one_module(keep_first, tmp_path, model_dir, capsys):
    cfg = flap_llm.PruneConfig(ratio=0.5, method="keep-first", options=FirstOptions(side="back", heads=True))
    assert cfg.label == "keep-first, back" and not cfg.needs_data and cfg.effective_compensation == "none"
    assert flap_llm.PruneConfig.from_dict(cfg.to_dict()) == cfg
    assert flap_llm.PruneConfig(method="keep-first", side="back").options == FirstOptions(side="back")  # 0.1-style
    model = tiny_model("llama-gqa")
    result = flap_llm.prune(model, None, cfg)
    assert [lp.channels for lp in result.plan.layers] == [tuple(range(48, 96))] * 2
    assert [lp.kv_heads for lp in result.plan.layers] == [(1,)] * 2
    assert result.report["config"]["options"] == {"side": "back", "heads": True}
    with pytest.raises(flap_llm.FlapError, match="method keep-first is not offered for Gemma3ForCausalLM: a test "
                                                 "refuses Gemma 3; use another method"):
        flap_llm.prune(tiny_model("gemma3"), None, cfg)
    with pytest.raises(flap_llm.FlapError, match="unknown side 'middle'"):
        FirstOptions(side="middle")
    # the command line: its flags, in its own group
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    help_text = capsys.readouterr().out
    group = help_text.index("options of --method keep-first:")
    assert group < help_text.index("--side {front,back}", group) < help_text.index("--heads", group)
    assert "keep-first: a test's method" in " ".join(help_text.split())
    assert main(["prune", "--quiet", "--model", str(model_dir), "--method", "keep-first", "--side", "back", "--heads",
                 "--ratio", "0.5", "--no-eval", "--export", "hf-uniform", "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["config"] == {"ratio": 0.5, "method": "keep-first", "options": {"side": "back", "heads": True},
                                "mode": "prune", "align": None}
    assert report["compensation"] == "none" and report["title"] == "model: keep-first, back 50%"
    assert "keep-first" in (tmp_path / "out" / "README.md").read_text()  # the model card names the method
    assert main(["prune", "--quiet", "--model", str(model_dir), "--metric", "IFV", "--method", "keep-first",
                 "--out", str(tmp_path / "o2")]) == 2
    assert "--metric: option of --method flap, not keep-first" in capsys.readouterr().err
    # the dry run asks the method for its cost
    assert main(["prune", "--dry-run", "--json", "--model", str(model_dir), "--method", "keep-first",
                 "--out", str(tmp_path / "o3")]) == 0
    est = json.loads(capsys.readouterr().out)
    assert est["parts"]["keep-first's scratch"] == 12345 * 2 and est["work"]["passes"] == {"forward": 0, "backward": 0}
    assert "keep-first, front" in est["run"]
