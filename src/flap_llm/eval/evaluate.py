"""Perplexity with the paper's convention: join the evaluation text with blank lines, tokenize once,
cut into non-overlapping windows, mean token NLL over all windows, exponentiate."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..calibration.data import bos_id, load_texts, tokenize_corpus
from ..errors import FlapError


def eval_windows(ids: torch.Tensor, seqlen: int, bos: int | None, limit: int | None = None) -> torch.Tensor:
    """[W, seqlen] windows; with a BOS each window is BOS + (seqlen - 1) text tokens."""
    step = seqlen - (bos is not None)
    if step < 1:
        raise FlapError("--eval-seqlen must be at least 2 when the tokenizer adds BOS")
    n = ids.numel() // step
    if n == 0:
        raise FlapError(f"the evaluation text has only {ids.numel()} tokens, fewer than one window of {step}; "
                        "use a shorter --eval-seqlen or more text")
    if limit is not None:
        n = min(n, limit)
    windows = ids[: n * step].reshape(n, step)
    if bos is not None:
        windows = torch.cat([torch.full((n, 1), bos, dtype=windows.dtype), windows], 1)
    return windows


@torch.no_grad()
def perplexity_of_windows(model: nn.Module, windows: torch.Tensor, batch_size: int = 8,
                          progress: bool = False) -> dict:
    """Mean NLL over every predicted token of every window (the BOS is never a target)."""
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for batch in tqdm(windows.split(batch_size), desc="perplexity", disable=not progress, unit="batch"):
        batch = batch.to(device)
        logits = model(batch, use_cache=False).logits[:, :-1].float()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        total_nll += float(nll)
        total_tokens += batch[:, 1:].numel()
    mean = total_nll / total_tokens
    return {"ppl": math.exp(mean), "nll": mean, "windows": windows.shape[0], "tokens": total_tokens}


def perplexity(model: nn.Module, tokenizer, spec: str = "builtin:wiki", seqlen: int = 128, batch_size: int = 8,
               limit: int | None = None, progress: bool = False) -> dict:
    """Perplexity on a text spec's evaluation split (held-out articles for builtin:wiki)."""
    ids = tokenize_corpus(load_texts(spec, "eval"), tokenizer)
    windows = eval_windows(ids, seqlen, bos_id(tokenizer), limit)
    out = perplexity_of_windows(model, windows, batch_size, progress)
    return {"spec": spec, "seqlen": seqlen, **out}


@torch.no_grad()
def chunked_perplexity(model: nn.Module, ids: torch.Tensor, n_ctx: int, chunks: int, bos: int | None = None,
                       batch_size: int = 4) -> float:
    """llama-perplexity's number, computed in transformers: the token stream (with BOS in front when the
    vocabulary adds one) cut into n_ctx-token chunks, the first token of each replaced by BOS, and only the
    second half of each chunk scored (logits at n_ctx/2 .. n_ctx-2 predict tokens n_ctx/2+1 .. n_ctx-1)."""
    if bos is not None:
        ids = torch.cat([ids.new_tensor([bos]), ids])
    n = min(ids.numel() // n_ctx, chunks)
    if n < 1:
        raise FlapError(f"{ids.numel()} tokens make no chunk of {n_ctx}")
    windows = ids[: n * n_ctx].reshape(n, n_ctx).clone()
    if bos is not None:
        windows[:, 0] = bos
    first = n_ctx // 2
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for batch in windows.split(batch_size):
        batch = batch.to(device)
        logits = model(batch, use_cache=False).logits[:, first:n_ctx - 1].double()
        targets = batch[:, first + 1:]
        nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"))
        count += targets.numel()
    return math.exp(nll / count)
