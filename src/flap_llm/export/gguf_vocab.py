"""The tokenizer part of a GGUF file: carried over from the source GGUF, or built from a Hugging Face
tokenizer.json (byte-level BPE, or SentencePiece-style BPE with byte fallback), so that llama.cpp tokenizes
exactly as transformers does."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import FlapError
from ..calibration.data import bos_id

# llama.cpp names its pre-tokenizers (`tokenizer.ggml.pre`); we recognise a Hugging Face pre-tokenizer by
# its structure and regular expression. The expressions are the published ones of each family.
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
          r"\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
           r"\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLIT_REGEX = {_QWEN2: "qwen2", _LLAMA3: "llama-bpe"}

# GGUF token types (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


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


def _merge_scores(tokens: list[str], merges: list[str]) -> list[float]:
    """SentencePiece scores that make llama.cpp's SPM tokenizer merge in the order of tokenizer.json's merges.

    llama.cpp repeatedly merges the adjacent pair whose concatenation has the highest score; transformers the
    pair with the lowest merge rank. A token scores minus the first rank that produces it; tokens no merge
    produces (single characters, bytes, specials) score below every merge and never decide one. Converted
    SentencePiece models list all merges of one token together, so both orders agree exactly.
    """
    first_rank: dict[str, int] = {}
    for rank, merge in enumerate(merges):
        first_rank.setdefault(merge.replace(" ", ""), rank)
    floor = -float(len(merges) + 1)
    return [-float(first_rank[t]) if t in first_rank else floor for t in tokens]


def _space_prefix(spec: dict) -> bool:
    """Whether a SentencePiece-style tokenizer.json puts '▁' before the text, as llama.cpp's add_space_prefix."""
    pre, norm = spec.get("pre_tokenizer"), spec.get("normalizer")
    norm_steps = (norm or {}).get("normalizers", [norm] if norm else [])
    kinds = [n.get("type") for n in norm_steps]
    if pre is None and kinds in (["Prepend", "Replace"], ["Replace"]):
        # the older Llama form: prepend '▁' (optional), then spaces become '▁'
        replace = norm_steps[-1]
        if (replace.get("pattern") or {}).get("String") == " " and replace.get("content") == "\u2581":
            return kinds[0] == "Prepend" and norm_steps[0].get("prepend") == "\u2581"
    if norm is None and (pre or {}).get("type") == "Metaspace" and not pre.get("split", True) \
            and pre.get("replacement") == "\u2581" and pre.get("prepend_scheme") in ("first", "always", "never"):
        return pre["prepend_scheme"] != "never"
    raise FlapError(f"unsupported SentencePiece-style tokenizer (normalizer {json.dumps(norm)[:120]}, pre_tokenizer "
                    f"{json.dumps(pre)[:120]}): llama.cpp would split the text differently; export from the model's "
                    "original .gguf file, whose tokenizer is carried over")


def _is_byte_token(token: str) -> bool:
    return len(token) == 6 and token.startswith("<0x") and token.endswith(">")


def _write_bpe(writer, spec: dict, model: dict, tokens: list[str], types: list[int]) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(spec.get("pre_tokenizer")))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(_merges(model))


def _write_spm(writer, spec: dict, model: dict, tokens: list[str], types: list[int], unk_id: int | None) -> None:
    space_prefix = _space_prefix(spec)
    types = [BYTE if t == NORMAL and _is_byte_token(tok) else t for tok, t in zip(tokens, types)]
    if unk_id is not None:
        types[unk_id] = UNKNOWN
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(_merge_scores(tokens, _merges(model)))
    writer.add_token_types(types)
    writer.add_add_space_prefix(space_prefix)


def write_hf_vocab(tokenizer, writer, n_vocab: int) -> None:
    """Vocabulary, merges or scores, special tokens, BOS/EOS flags and chat template of a BPE tokenizer:
    byte-level (GPT-2, Llama-3, Qwen2, SmolLM) as llama.cpp's `gpt2` model, SentencePiece-style (byte
    fallback, '▁' for spaces: Llama-2, Mistral, TinyLlama) as its `llama` model."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise FlapError("GGUF export needs a fast (tokenizer.json) tokenizer, or the model's original .gguf file")
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise FlapError(f"GGUF export supports BPE tokenizers (byte-level or SentencePiece-style); this one is "
                        f"{model.get('type')}: export from the model's original .gguf file, whose tokenizer is "
                        "carried over")
    tokens, types = _tokens_and_types(tokenizer, n_vocab)
    if model.get("byte_fallback"):
        _write_spm(writer, spec, model, tokens, types, tokenizer.unk_token_id)
    else:
        _write_bpe(writer, spec, model, tokens, types)
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
