"""A real full disk: a small tmpfs mounted for the test (as root, where mounting is allowed; skipped with the
reason elsewhere). Every writer we use (safetensors, the GGUF writer, llama-quantize, torch.save, plain text)
ends in one DiskFullError line that says what was being written, what it needs and what is free, and leaves
nothing on the disk."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import tiny_model, tiny_tokenizer
from flap_llm.cli import main
from flap_llm.errors import DiskFullError

@pytest.fixture
def small_disk(tmp_path):
    """Mount a tmpfs of the size asked for at tmp_path/disk; unmounted afterwards."""
    mounted = []

    def mount(size: str) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root")
        point = tmp_path / "disk"
        point.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"this machine does not allow mounting a tmpfs: {proc.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)


def _fill(disk: Path, leave: int) -> Path:
    """Take all but `leave` bytes of the disk with a filler file (tmpfs counts whole 4 KiB pages)."""
    filler = disk / "filler"
    free = shutil.disk_usage(disk).free
    with open(filler, "wb") as f:
        block = b"\0" * (1 << 20)
        todo = max(0, free - leave)
        while todo > 0:
            todo -= f.write(block[:min(len(block), todo)])
    return filler


def _one_line(err: str, what: str, target: Path) -> None:
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert f"the disk filled while writing {what} to {target}: it needs " in err, err
    needed = re.search(r"it needs (about|more than the) ([\d.]+) (bytes|KiB|MiB|GiB)", err)
    assert needed and float(needed.group(2)) > 0, err
    assert re.search(r"and [\d.]+ (bytes|KiB|MiB|GiB) is free there; nothing partial was left", err), err


def _tiny():
    tokenizer = tiny_tokenizer()
    model = tiny_model("llama-gqa")
    model.resize_token_embeddings(len(tokenizer))
    return model, tokenizer


@pytest.mark.parametrize("writer", ["safetensors", "gguf", "llama-quantize", "torch.save", "text"])
def test_every_writer_on_a_full_disk_raises_one_disk_full_error(small_disk, tmp_path, writer):
    """Each writer the library uses, through the library's own call, on a real full filesystem."""
    import flap_llm
    from flap_llm.atomic import write_text_atomic
    from flap_llm.healing.distill import _save_state
    disk = small_disk("4m")
    model, tokenizer = _tiny()
    if writer == "llama-quantize":  # the f16 file fits, llama-quantize's output does not
        from flap_llm.export.llamacpp import bin_dir
        if bin_dir() is None:
            pytest.skip("llama.cpp's tools are not installed")
        f16 = flap_llm.save_gguf(model, tmp_path / "probe.gguf", tokenizer)
        _fill(disk, f16.stat().st_size + 8192)
    else:
        _fill(disk, 0)
    target = disk / {"safetensors": "out", "gguf": "m.gguf", "llama-quantize": "m.gguf", "torch.save": "state.pt",
                     "text": "notes.md"}[writer]
    what = {"safetensors": "the pruned checkpoint", "gguf": "the GGUF file", "llama-quantize": "the Q4_0 GGUF file",
            "torch.save": "the heal resume checkpoint", "text": "the output file"}[writer]
    with pytest.raises(DiskFullError) as raised:
        if writer == "safetensors":
            flap_llm.save_pruned(model, target, tokenizer=tokenizer)
        elif writer in ("gguf", "llama-quantize"):
            flap_llm.save_gguf(model, target, tokenizer, "f16" if writer == "gguf" else "Q4_0")
        elif writer == "torch.save":
            _save_state(target, {"weights": torch.zeros(1 << 20)})
        else:
            write_text_atomic(target, "x" * (1 << 20))
    _one_line(str(raised.value), what, target)
    assert sorted(p.name for p in disk.iterdir()) == ["filler"]


@pytest.mark.slow
def test_the_cli_on_a_60_mb_disk_exits_1_with_one_line(small_disk, capsys):
    """The real SmolLM2 pruned, exported at f32 and pruned to Q4_K_M onto a 60 MB tmpfs: each run exits 1 with
    one line naming what it was writing, what that needs and what is free, and leaves the disk empty."""
    disk = small_disk("60m")
    few = ["--nsamples", "4", "--seqlen", "16", "--no-eval", "--quiet"]
    runs = [(["prune", *few, "--out", str(disk / "out")], "the pruned checkpoint", disk / "out"),
            (["export", "--quiet", "--dtype", "f32", "--out", str(disk / "m.gguf")], "the GGUF file", disk / "m.gguf"),
            (["prune", *few, "--gguf", "Q4_K_M", "--out", str(disk / "q")], "the pruned checkpoint", disk / "q")]
    for args, what, target in runs:
        rc = main(list(args))
        stderr = capsys.readouterr().err
        assert rc == 1, stderr[-2000:]
        # (the first run on a machine converts the built-in GGUF once, with transformers' progress bar)
        err = "\n".join(line for line in stderr.splitlines() if "it/s]" not in line)
        assert err.startswith("flap-llm: error: "), err
        _one_line(err.replace("flap-llm: error: ", "", 1), what, target)
        assert list(disk.iterdir()) == [], list(disk.iterdir())
