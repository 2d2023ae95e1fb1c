"""The tokenizer part of a GGUF file: carried over from the source GGUF, or built from a Hugging Face
byte-level BPE tokenizer (tokenizer.json), so that llama.cpp tokenizes exactly as transformers does."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import FlapError
from ..evaluate import bos_id

# llama.cpp names its pre-tokenizers (`tokenizer.ggml.pre`); we recognise a Hugging Face pre-tokenizer by
# its structure and regular expression. The expressions are the published ones of each family.
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
          r"\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
           r"\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLIT_REGEX = {_QWEN2: "qwen2", _LLAMA3: "llama-bpe"}

# GGUF token types (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED = 1, 2, 3, 4, 5


def _steps(pre: dict | None) -> list[dict]:
    if not pre:
        return []
    return list(pre["pretokenizers"]) if pre.get("type") == "Sequence" else [pre]


def pre_tokenizer_name(pre: dict | None) -> str:
    """llama.cpp's name for a tokenizer.json pre_tokenizer; an unknown one is an error, never a guess."""
    steps = _steps(pre)
    kinds = [s.get("type") for s in steps]
    byte_level = [s for s in steps if s.get("type") == "ByteLevel"]
    if kinds == ["ByteLevel"] and byte_level[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and byte_level[0].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not byte_level[0].get("use_regex", True):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        if regex in _SPLIT_REGEX:
            return _SPLIT_REGEX[regex]
    raise FlapError(f"unknown pre-tokenizer {json.dumps(pre)[:200]}; llama.cpp needs its name to tokenize the same "
                    "way: export from the model's original .gguf file (its tokenizer is carried over)")


def copy_gguf_vocab(source: Path, writer, n_vocab: int) -> None:
    """Carry every tokenizer.* key of a GGUF file over unchanged."""
    import gguf

    reader = gguf.GGUFReader(str(source))
    fields = {k: f for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    tokens = fields.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise FlapError(f"{source} has no tokenizer; export with the model's Hugging Face tokenizer instead")
    if len(tokens.data) != n_vocab:
        raise FlapError(f"{source} has {len(tokens.data)} tokens but the model's embedding {n_vocab} rows; "
                        "it is not this model's tokenizer")
    for key, field in fields.items():
        vtype = field.types[0]
        sub = field.types[1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub)


def _tokens_and_types(tokenizer, n_vocab: int) -> tuple[list[str], list[int]]:
    vocab = {i: t for t, i in tokenizer.get_vocab().items()}
    if max(vocab) >= n_vocab:
        raise FlapError(f"the tokenizer has token id {max(vocab)} but the model only {n_vocab} embedding rows; "
                        "it is not this model's tokenizer")
    added = tokenizer.added_tokens_decoder  # {id: AddedToken}
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in vocab:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        else:
            tokens.append(vocab[i])
            types.append((CONTROL if added[i].special else USER_DEFINED) if i in added else NORMAL)
    return tokens, types


def _merges(model: dict) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]


def _adds_eos(tokenizer) -> bool:
    eos = tokenizer.eos_token_id
    ids = tokenizer("a", add_special_tokens=True).input_ids
    return eos is not None and bool(ids) and ids[-1] == eos


def write_hf_vocab(tokenizer, writer, n_vocab: int) -> None:
    """Vocabulary, merges, special tokens, BOS/EOS flags and chat template of a byte-level BPE tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise FlapError("GGUF export needs a fast (tokenizer.json) tokenizer, or the model's original .gguf file")
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise FlapError(f"GGUF export supports byte-level BPE tokenizers (GPT-2, Llama-3, Qwen2, SmolLM); this one "
                        f"is {model.get('type')}{' with byte fallback (SentencePiece style)' if model.get('byte_fallback') else ''}: "
                        "export from the model's original .gguf file, whose tokenizer is carried over")
    pre = pre_tokenizer_name(spec.get("pre_tokenizer"))
    tokens, types = _tokens_and_types(tokenizer, n_vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(_merges(model))
    for token_id, add in ((tokenizer.bos_token_id, writer.add_bos_token_id),
                          (tokenizer.eos_token_id, writer.add_eos_token_id),
                          (tokenizer.unk_token_id, writer.add_unk_token_id),
                          (tokenizer.pad_token_id, writer.add_pad_token_id)):
        if token_id is not None:
            add(int(token_id))
    writer.add_add_bos_token(bos_id(tokenizer) is not None)
    writer.add_add_eos_token(_adds_eos(tokenizer))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        writer.add_chat_template(template)
