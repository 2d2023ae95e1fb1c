"""Bad input is refused before the expensive work (exit 2, one line), signals leave no temporary output,
and nothing outside the output is ever changed. One test (or more) per case found by trying the CLI as a
new user would."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import flap_llm
from flap_llm import FlapError
from flap_llm.cli import main
from conftest import calibration, tiny_model

ROOT = Path(__file__).resolve().parents[1]


def _args(model_dir, text_file, *extra) -> list[str]:
    return ["prune", "--quiet", "--model", str(model_dir), "--calib", str(text_file), "--eval", str(text_file),
            "--nsamples", "8", "--seqlen", "16", "--eval-seqlen", "16", "--device", "cpu", *map(str, extra)]


@pytest.fixture
def no_expensive_work(monkeypatch):
    """Fail the test if a calibration pass or a perplexity evaluation starts."""
    def forbidden(*a, **k):
        raise AssertionError("expensive work started before the refusal")
    monkeypatch.setattr("flap_llm.eval.evaluate.perplexity", forbidden)
    monkeypatch.setattr("flap_llm.prune", forbidden)


def _refused(capsys, argv, *words) -> str:
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert err.count("\n") == 0 and err.startswith("flap-llm: error:"), err
    for w in words:
        assert w in err, err
    return err


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# 1 ------------------------------------------------------------------------------------------------
def test_align_larger_than_the_mlp_is_refused_up_front(tmp_path, model_dir, text_file, capsys, no_expensive_work):
    _refused(capsys, _args(model_dir, text_file, "--align", 1000, "--out", tmp_path / "o"), "align=1000", "MLP width")
    assert not (tmp_path / "o").exists()


def test_align_changes_each_layer_by_at_most_half_a_multiple():
    plain = tiny_model("llama-gqa", layers=4)
    aligned = tiny_model("llama-gqa", layers=4)
    a = flap_llm.prune(plain, calibration(), flap_llm.PruneConfig(ratio=0.3))
    b = flap_llm.prune(aligned, calibration(), flap_llm.PruneConfig(ratio=0.3, align=32))
    for x, y in zip(a.plan.kept_counts(), b.plan.kept_counts()):
        assert y["channels"] % 32 == 0 and abs(y["channels"] - x["channels"]) <= 16
    removed = [r.report["params"]["decoder_removed_fraction"] for r in (a, b)]
    per_layer_unit = 3 * 64 * 16 / a.report["params"]["decoder_before"]  # half a multiple of channels, one layer
    assert abs(removed[1] - removed[0]) <= 4 * per_layer_unit


# 2, 8 ---------------------------------------------------------------------------------------------
# The CLI, paused where a complete temporary output is about to be renamed into place: it touches the marker
# file and waits (at most a minute) to be signalled.
PAUSED_CLI = """
import sys, time
from pathlib import Path
import flap_llm.atomic as atomic
from flap_llm.cli import main
commit = atomic.commit
def paused(tmp, path):
    Path(sys.argv[1]).touch()
    time.sleep(60)
    commit(tmp, path)
atomic.commit = paused
sys.exit(main(sys.argv[2:]))
"""


def _run_until_paused(tmp_path, argv: list[str]) -> subprocess.Popen:
    marker = tmp_path / "paused"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    # a shell's background job starts with SIGINT ignored, and Python then keeps ignoring it: give the child
    # the default disposition, as in a terminal
    proc = subprocess.Popen([sys.executable, "-c", PAUSED_CLI, str(marker), *argv], env=env, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    while not marker.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"never reached the save point: {proc.stderr.read()}")
        time.sleep(0.05)
    return proc


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_while_saving_leaves_nothing(tmp_path, model_dir, text_file, sig, code):
    before = _snapshot(model_dir)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("an existing --out stays as it was")
    proc = _run_until_paused(tmp_path, _args(model_dir, text_file, "--out", out, "--overwrite", "--no-eval"))
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert err.strip().count("\n") == 0 and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt", "out", "paused"]  # no .out.tmp-*
    assert _snapshot(out) == {Path("keep.txt"): b"an existing --out stays as it was"}
    assert _snapshot(model_dir) == before


def test_signal_while_writing_a_gguf_leaves_nothing(tmp_path, model_dir):
    proc = _run_until_paused(tmp_path, ["export", "--quiet", "--model", str(model_dir), "--out", str(tmp_path / "m.gguf")])
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode == 143
    assert sorted(p.name for p in tmp_path.iterdir()) == ["paused"]


def test_stale_temporaries_of_a_killed_run_are_removed(tmp_path, model_dir, text_file):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".out.tmp-{dead.stdout.strip()}-abcd1234"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 1000)
    assert main(_args(model_dir, text_file, "--out", tmp_path / "out", "--no-eval")) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt", "out"]


# 3, 4 ---------------------------------------------------------------------------------------------
def test_out_is_the_current_folder(tmp_path, model_dir, text_file, capsys, monkeypatch, no_expensive_work):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    _refused(capsys, _args(model_dir, text_file, "--out", ".", "--overwrite"), "current folder")
    assert list(work.iterdir()) == []


def test_out_under_a_file_is_refused_up_front(tmp_path, model_dir, text_file, capsys, no_expensive_work):
    (tmp_path / "afile").write_text("x")
    _refused(capsys, _args(model_dir, text_file, "--out", tmp_path / "afile" / "sub"), "is a file")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_out_in_a_read_only_folder_is_refused_up_front(tmp_path, model_dir, text_file, capsys, no_expensive_work):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    _refused(capsys, _args(model_dir, text_file, "--out", ro / "out"), "permission")


def test_eval_report_files_are_checked_before_evaluating(tmp_path, model_dir, text_file, capsys, no_expensive_work):
    base = ["eval", "--quiet", "--model", str(model_dir), "--ppl", str(text_file), "--eval-seqlen", "16"]
    _refused(capsys, base + ["--json", str(tmp_path / "missing" / "x.json")], "does not exist")
    _refused(capsys, base + ["--md", str(tmp_path)], "is a folder")


# 5, 6 ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flag,value,words", [("--eval-seqlen", 1, "at least 2"), ("--eval-limit", 0, "at least 1"),
                                              ("--eval-limit", -1, "at least 1")])
def test_bad_evaluation_windows(tmp_path, model_dir, text_file, capsys, no_expensive_work, flag, value, words):
    _refused(capsys, _args(model_dir, text_file, flag, value, "--out", tmp_path / "o"), words)


@pytest.mark.parametrize("content,words", [(b'{"text": "caf\xe9"}\n', "UTF-8"), (b'{"text": null}\n', "not a string"),
                                           (b"\x00" * 500, "no text")])
def test_bad_text_files(tmp_path, model_dir, capsys, no_expensive_work, content, words):
    bad = tmp_path / ("bad.txt" if content.startswith(b"\x00") else "bad.jsonl")
    bad.write_bytes(content)
    _refused(capsys, _args(model_dir, bad, "--out", tmp_path / "o"), words)


# 7 ------------------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu(tmp_path, model_dir, text_file, capsys):
    argv = _args(model_dir, text_file, "--out", tmp_path / "o")
    argv[argv.index("--device") + 1] = "cuda:0"
    _refused(capsys, argv, "no CUDA GPU")
    model, result = _pruned()
    flap_llm.save_pruned(model, tmp_path / "ck", result=result)
    with pytest.raises(FlapError, match="no CUDA GPU"):
        flap_llm.load_pruned(tmp_path / "ck", device="cuda")


def _pruned():
    model = tiny_model("llama-gqa")
    result = flap_llm.prune(model, calibration(), flap_llm.PruneConfig(ratio=0.3))
    return model, result


# 9 ------------------------------------------------------------------------------------------------
def test_unsupported_architecture_is_refused_before_any_evaluation(tmp_path, capsys, no_expensive_work, text_file,
                                                                   monkeypatch):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    from conftest import tiny_tokenizer
    tok = tiny_tokenizer()
    folder = tmp_path / "neox"
    GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64)).save_pretrained(folder)
    tok.save_pretrained(folder)
    capsys.readouterr()
    # from the config alone: no weight is read
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("weights loaded")))
    _refused(capsys, _args(folder, text_file, "--out", tmp_path / "o"), "unsupported architecture", "GPTNeoX")


def test_underlying_errors_are_one_short_line(tmp_path, capsys):
    from flap_llm.model.models import _brief
    assert _brief(OSError("first line\nsecond line\nthird")) == "OSError: first line"
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "model_type": "llama"')  # cut short
    _refused(capsys, ["eval", "--quiet", "--model", str(folder)], "could not read a model config")


def test_hf_uniform_with_an_adaptive_structure_is_refused_before_loading(tmp_path, model_dir, text_file, capsys,
                                                                        monkeypatch):
    monkeypatch.setattr("flap_llm.model.models.load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    _refused(capsys, _args(model_dir, text_file, "--export", "hf-uniform", "--out", tmp_path / "o"), "UL-UM")


# 10 -----------------------------------------------------------------------------------------------
def test_out_inside_the_source_model_folder(tmp_path, model_dir, text_file, capsys, no_expensive_work):
    before = _snapshot(model_dir)
    _refused(capsys, _args(model_dir, text_file, "--out", model_dir / "pruned"), "inside the source model")
    assert _snapshot(model_dir) == before


def test_windows_longer_than_the_model_warns(tmp_path, model_dir, text_file, capsys):
    assert main(_args(model_dir, text_file, "--seqlen", 300, "--nsamples", 2, "--no-eval", "--out", tmp_path / "o")) == 0
    assert "longer than the model's 256 positions" in capsys.readouterr().err


# 11 -----------------------------------------------------------------------------------------------
def test_messages_that_used_to_mislead(tmp_path):
    from flap_llm.calibration.data import sample_windows
    with pytest.raises(FlapError) as e:
        sample_windows(torch.tensor([5]), 4, 16, 0, "tiny.txt")
    assert "--seqlen" not in str(e.value) and "more text" in str(e.value)
    with pytest.raises(FlapError, match="unknown dtype"):
        flap_llm.load_pruned(tmp_path, dtype="nonsense")
    with pytest.raises(FlapError, match="stats"):
        flap_llm.prune(tiny_model(), calibration(), flap_llm.PruneConfig(), statistics=[1, 2, 3, 4])


def test_export_refuses_before_loading(tmp_path, model_dir, capsys, monkeypatch):
    monkeypatch.setattr("flap_llm.model.models.load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    _refused(capsys, ["export", "--quiet", "--model", str(model_dir), "--out", str(tmp_path / "m.bin")], ".gguf")
    (tmp_path / "m.gguf").write_text("x")
    _refused(capsys, ["export", "--quiet", "--model", str(model_dir), "--out", str(tmp_path / "m.gguf")], "exists")
    _refused(capsys, ["export", "--quiet", "--model", str(model_dir), "--out", str(tmp_path / "m.gguf" / "x.gguf")],
             "is a file")
    assert json.dumps(sorted(p.name for p in tmp_path.iterdir())) == '["m.gguf"]'


def test_calibration_text_shorter_than_the_windows_asked_warns(tmp_path, model_dir, capsys):
    """1024 windows of 16 tokens from a short file overlap heavily: a warning gives the text's tokens against
    the tokens asked for; the run still completes."""
    short = tmp_path / "short.txt"
    short.write_text("The quick brown fox jumps over the lazy dog. " * 12)
    rc = main(["prune", "--quiet", "--model", str(model_dir), "--calib", str(short), "--no-eval", "--nsamples", "64",
               "--seqlen", "16", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 0, err
    import re
    m = re.search(r"flap-llm: warning: .*short\.txt holds (\d+) distinct tokens of text, but 64 windows of 16 ask for "
                  r"1024: the windows overlap, each token in about ([\d.]+) of them", err)
    assert m, err
    assert int(m.group(1)) < 1024 and float(m.group(2)) == pytest.approx(1024 / int(m.group(1)), abs=0.05)
    assert (tmp_path / "out" / "flap_manifest.json").is_file()
    # enough text: no warning
    from flap_llm.calibration.data import sample_windows
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sample_windows(torch.arange(2000), 8, 16, 0)


def test_a_dry_run_on_a_config_without_its_shape_fields_names_them(tmp_path, capsys):
    """A config.json with only hidden_size: transformers would fill the rest with Llama-7B's defaults; the dry
    run refuses (exit 2) and names each missing field."""
    folder = tmp_path / "partial"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                                    "hidden_size": 576}))
    err = _refused(capsys, ["prune", "--dry-run", "--model", str(folder)], "lacks num_hidden_layers, "
                   "intermediate_size, num_attention_heads, vocab_size", "complete config.json")
    assert "hidden_size" not in err
