"""The flap-llm command line, end to end on a tiny model saved to a temp folder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flap_llm.cli import main
from conftest import CLI_TEXT as TEXT, tiny_checkpoint



def _snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def run_cli(*args) -> int:
    return main(["prune", "--quiet", *map(str, args)])


def test_prune_end_to_end(tmp_path, model_dir, text_file, capsys):
    before = _snapshot(model_dir)
    out = tmp_path / "out"
    rc = run_cli("--model", model_dir, "--calib", text_file, "--eval", text_file, "--nsamples", 8, "--seqlen", 16,
                 "--eval-seqlen", 16, "--ratio", 0.3, "--out", out, "--device", "cpu")
    assert rc == 0
    names = {p.name for p in out.iterdir()}
    assert {"flap_manifest.json", "report.json", "report.md", "plan.png", "config.json", "model.safetensors",
            "modeling_flap.py", "tokenizer.json"} <= names
    manifest = json.loads((out / "flap_manifest.json").read_text())
    report = json.loads((out / "report.json").read_text())
    assert manifest["plan"] == report["plan"]
    assert manifest["seed"] == 0
    assert manifest["calibration"] == {"source": str(text_file), "nsamples": 8, "seqlen": 16, "seed": 0,
                                       "bos_first": False}
    assert manifest["prune_config"]["ratio"] == 0.3
    assert {"torch", "transformers"} <= set(manifest["versions"])
    ppl = report["perplexity"]
    assert ppl["ppl_before"] > 1 and ppl["ppl_after"] > 1
    assert 0.3 <= report["params"]["decoder_removed_fraction"] < 0.4
    assert (out / "plan.png").read_bytes()[:4] == b"\x89PNG"
    assert "| layer | heads |" in (out / "report.md").read_text()
    assert _snapshot(model_dir) == before  # the source model is never modified
    # the saved model evaluates with `flap-llm eval`, and its perplexity is the one reported
    res_file = tmp_path / "ppl.json"
    assert main(["eval", "--quiet", "--model", str(out), "--ppl", str(text_file), "--eval-seqlen", "16",
                 "--json", str(res_file), "--device", "cpu"]) == 0
    assert json.loads(res_file.read_text())["perplexity"]["ppl"] == pytest.approx(ppl["ppl_after"], rel=1e-5)
    assert "perplexity" in capsys.readouterr().out


def test_prune_jsonl_mask_uniform_export(tmp_path, model_dir):
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": TEXT[i * 500:(i + 1) * 500]}) for i in range(10)))
    out = tmp_path / "u"
    rc = run_cli("--model", model_dir, "--calib", jsonl, "--no-eval", "--nsamples", 4, "--seqlen", 16,
                 "--structure", "UL-UM", "--ratio", 0.5, "--export", "hf-uniform", "--out", out)
    assert rc == 0
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.intermediate_size == 48 and model.config.num_key_value_heads == 1


def test_prune_obs(tmp_path, model_dir, text_file):
    """--method obs end to end: the manifest and the report record only obs's options, the checkpoint reloads
    with its perplexity; FLAP's uniform structure exports as a stock model."""
    out = tmp_path / "obs"
    rc = run_cli("--model", model_dir, "--calib", text_file, "--eval", text_file, "--nsamples", 8, "--seqlen", 16,
                 "--eval-seqlen", 16, "--ratio", 0.4, "--method", "obs", "--lsq-damp", 0.05, "--out", out)
    assert rc == 0
    manifest = json.loads((out / "flap_manifest.json").read_text())
    report = json.loads((out / "report.json").read_text())
    for cfg in (manifest["prune_config"], report["config"]):
        assert cfg == {"ratio": 0.4, "method": "obs", "options": {"allocation": "held-out", "lsq_damp": 0.05},
                       "mode": "prune", "align": None}
    assert report["compensation"] == "lsq"
    assert report["params"]["decoder_removed_fraction"] == pytest.approx(0.4, abs=0.01)
    res_file = tmp_path / "ppl.json"
    assert main(["eval", "--quiet", "--model", str(out), "--ppl", str(text_file), "--eval-seqlen", "16",
                 "--json", str(res_file), "--device", "cpu"]) == 0
    assert json.loads(res_file.read_text())["perplexity"]["ppl"] == pytest.approx(report["perplexity"]["ppl_after"],
                                                                                rel=1e-5)
    flap_out = tmp_path / "flap"  # a plain FLAP run records FLAP's options alone
    assert run_cli("--model", model_dir, "--calib", text_file, "--no-eval", "--nsamples", 8, "--seqlen", 16,
                   "--out", flap_out) == 0
    assert json.loads((flap_out / "report.json").read_text())["config"]["options"] == {
        "metric": "WIFV", "structure": "AL-AM", "compensation": "bias"}
    assert "allocation" not in (flap_out / "report.md").read_text()
    uniform = tmp_path / "uniform"
    assert run_cli("--model", model_dir, "--calib", text_file, "--no-eval", "--nsamples", 8, "--seqlen", 16,
                   "--ratio", 0.5, "--structure", "UL-UM", "--compensation", "lsq", "--export", "hf-uniform",
                   "--out", uniform) == 0
    from transformers import AutoModelForCausalLM
    assert AutoModelForCausalLM.from_pretrained(uniform).config.intermediate_size == 48


def test_help_groups_each_methods_options(capsys):
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    out = capsys.readouterr().out
    flap, obs = out.index("options of --method flap:"), out.index("options of --method obs:")
    assert flap < out.index("--compensation {", flap) < obs < out.index("--allocation {", obs)
    for gone in ("--selection", "--fisher-fraction", "--select-damp", "--token-windows", "--no-sequential"):
        assert gone not in out


def test_python_dash_m_alias(tmp_path, model_dir, text_file):
    out = tmp_path / "o"
    proc = subprocess.run([sys.executable, "-m", "flap_llm", "prune", "--model", str(model_dir), "--calib",
                           str(text_file), "--no-eval", "--nsamples", "4", "--seqlen", "16", "--out", str(out),
                           "--method", "mag-sp", "--quiet"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "flap_manifest.json").read_text())["prune_config"]["method"] == "mag-sp"


@pytest.mark.parametrize("make_args, words", [
    (lambda t, m, f: ["--model", t / "nope"], "does not exist"),
    (lambda t, m, f: ["--model", f], "neither a model folder"),
    (lambda t, m, f: ["--model", t], "no config.json"),
    (lambda t, m, f: ["--model", m, "--calib", t / "missing.txt"], "does not exist"),
    (lambda t, m, f: ["--model", m, "--calib", "builtin:poems"], "unknown built-in text"),
    (lambda t, m, f: ["--model", m, "--calib", f, "--seqlen", 100000], "only .* tokens, too short for windows of 100000"),
    (lambda t, m, f: ["--model", m, "--ratio", 1.5], "ratio must be in"),
    (lambda t, m, f: ["--model", m, "--out", m], "source model"),
    (lambda t, m, f: ["--model", m, "--structure", "AL-MM"], "remove_heads"),
    (lambda t, m, f: ["--model", t / "bad.gguf"], "could not load the GGUF"),
    (lambda t, m, f: ["--model", "builtin:gpt5"], "unknown built-in model"),
    (lambda t, m, f: ["--model", m, "--allocation", "measured"], "--allocation: option of --method obs, not flap"),
    (lambda t, m, f: ["--model", m, "--method", "obs", "--metric", "IFV"], "--metric: option of --method flap, not obs"),
    (lambda t, m, f: ["--model", m, "--method", "wanda-sp", "--compensation", "lsq"], "option of --method flap"),
    (lambda t, m, f: ["--model", m, "--lsq-damp", 0.1], "are options of compensation lsq"),
    (lambda t, m, f: ["--model", m, "--method", "obs", "--export", "hf-uniform"], "which this plan \\(obs, held-out allocation\\) does not give"),
    (lambda t, m, f: ["--model", m, "--export", "hf-uniform"], "--structure UL-UM"),
    (lambda t, m, f: ["--model", m, "--method", "obs", "--ratio", 0.95], "needs more than the measured allocation"),
    (lambda t, m, f: ["--model", m, "--compensation", "lsq", "--lsq-damp", 0], "lsq_damp must be positive"),
    (lambda t, m, f: ["--model", m, "--sequential"], "options of compensation lsq"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, model_dir, text_file, capsys, make_args, words):
    (tmp_path / "bad.gguf").write_bytes(b"GGUF not really")
    args = [str(a) for a in make_args(tmp_path, model_dir, text_file)]
    if "--calib" not in args:
        args += ["--calib", str(text_file)]
    before = _snapshot(model_dir)
    base = ["prune", "--quiet", "--no-eval", "--nsamples", "4", "--seqlen", "16"]
    if "--out" not in args:
        base += ["--out", str(tmp_path / "out")]
    rc = main(base + args)
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith("flap-llm: error:")
    import re
    assert re.search(words, err), err
    assert "Traceback" not in err
    assert _snapshot(model_dir) == before
    assert not (tmp_path / "out").exists()


def test_empty_calibration_text(tmp_path, model_dir, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert run_cli("--model", model_dir, "--calib", empty, "--no-eval", "--out", tmp_path / "o") == 2
    assert "holds no text" in capsys.readouterr().err


def test_not_a_causal_lm(tmp_path, capsys):
    from transformers import BertConfig, BertModel
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37)).save_pretrained(
        tmp_path / "bert")
    assert run_cli("--model", tmp_path / "bert", "--no-eval", "--out", tmp_path / "o") == 2
    assert "not a causal language model" in capsys.readouterr().err


def test_out_not_empty_needs_overwrite(tmp_path, model_dir, text_file, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    args = ("--model", model_dir, "--calib", text_file, "--no-eval", "--nsamples", 4, "--seqlen", 16, "--out", out)
    assert run_cli(*args) == 2
    assert "not empty" in capsys.readouterr().err
    assert (out / "precious.txt").read_text() == "keep me"
    assert run_cli(*args, "--overwrite") == 0
    assert not (out / "precious.txt").exists()


def test_debug_shows_traceback(tmp_path, model_dir):
    with pytest.raises(Exception, match="ratio must be in"):
        main(["prune", "--debug", "--model", str(model_dir), "--ratio", "2", "--out", str(tmp_path / "o")])


def test_prune_offload(tmp_path, model_dir, text_file, capsys):
    args = ("--model", model_dir, "--calib", text_file, "--nsamples", 8, "--seqlen", 16, "--ratio", 0.4,
            "--device", "cpu")
    assert run_cli(*args, "--no-eval", "--out", tmp_path / "mem") == 0
    assert main(["prune", *map(str, args), "--offload", "--out", str(tmp_path / "off")]) == 0
    assert "no evaluation runs" in capsys.readouterr().out
    mem = json.loads((tmp_path / "mem" / "flap_manifest.json").read_text())
    off = json.loads((tmp_path / "off" / "flap_manifest.json").read_text())
    assert off["plan"] == mem["plan"] and off["parameters"] == mem["parameters"]
    assert (tmp_path / "off" / "plan.png").is_file() and (tmp_path / "off" / "tokenizer.json").is_file()
    assert "removed" in (tmp_path / "off" / "README.md").read_text()  # the model card, streamed or not
    import flap_llm
    ids = torch.randint(0, 200, (2, 12))
    with torch.no_grad():
        a = flap_llm.load_pruned(tmp_path / "mem")(ids).logits
        b = flap_llm.load_pruned(tmp_path / "off")(ids).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_eval_windows_bos_and_paper_convention():
    from flap_llm.eval.evaluate import eval_windows
    ids = torch.arange(10, 30)
    plain = eval_windows(ids, 8, None)
    assert plain.tolist() == [list(range(10, 18)), list(range(18, 26))]  # non-overlapping, tail dropped
    with_bos = eval_windows(ids, 8, 1)
    assert with_bos[:, 0].tolist() == [1, 1] and with_bos[0, 1:].tolist() == list(range(10, 17))
    assert eval_windows(ids, 8, None, limit=1).shape == (1, 8)


def test_perplexity_is_exp_mean_nll():
    from flap_llm.eval.evaluate import perplexity_of_windows
    from conftest import tiny_model
    model = tiny_model("llama-mha")
    windows = torch.randint(0, 96, (5, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logp = torch.log_softmax(model(windows).logits[:, :-1].double(), -1)
    nll = -logp.gather(-1, windows[:, 1:, None]).mean()
    res = perplexity_of_windows(model, windows, batch_size=2)
    assert res["tokens"] == 5 * 11
    assert res["ppl"] == pytest.approx(float(nll.exp()), rel=1e-5)


def test_obs_on_gemma3_refused_before_any_work(tmp_path, text_file, capsys):
    """--method obs on a family it is not offered for exits 2 with what to use instead, before calibration,
    evaluation or any output."""
    model = tiny_checkpoint(tmp_path / "gemma", "gemma3")
    capsys.readouterr()  # the checkpoint's own progress output
    out = tmp_path / "out"
    rc = main(["prune", "--quiet", "--model", str(model), "--calib", str(text_file), "--nsamples", "4", "--seqlen", "16",
               "--method", "obs", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "method obs is not offered for Gemma3ForCausalLM" in err and "--method flap --compensation lsq" in err
    assert not out.exists()


def test_prune_writes_a_model_card_the_hub_parses(tmp_path, model_dir, text_file):
    """README.md in --out: Hub front matter, what was removed, the measured table, how to load the folder; a hub
    id becomes base_model, a local folder does not."""
    from huggingface_hub import ModelCard

    from flap_llm.reporting.modelcard import hub_base
    out = tmp_path / "smol-30"
    assert run_cli("--model", model_dir, "--calib", text_file, "--eval", text_file, "--nsamples", 8, "--seqlen", 16,
                   "--eval-seqlen", 16, "--ratio", 0.3, "--out", out) == 0
    report = json.loads((out / "report.json").read_text())
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert {"pruned", "flap", "flap-llm"} <= set(card.data.tags)
    assert card.data.base_model is None  # a local folder is not a hub id
    p, ppl = report["params"], report["perplexity"]
    assert f"{p['decoder_removed_fraction']:.1%} of the decoder's attention and MLP weights" in card.text
    assert f"| perplexity ({ppl['spec']}, windows of 16 tokens) | {ppl['ppl_before']:.2f} | {ppl['ppl_after']:.2f} |" \
        in card.text
    assert 'flap_llm.load_pruned("smol-30")' in card.text and "trust_remote_code=True" in card.text
    assert "llama-cli" not in card.text  # no GGUF was written
    assert hub_base("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub_base("/root/.cache/flap-llm/SmolLM2-135M-Instruct.Q4_1-0123") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub_base(str(model_dir)) is None and hub_base(None) is None
