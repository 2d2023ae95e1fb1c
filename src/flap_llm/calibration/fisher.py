"""How much the model's output distribution cares about each module's output: the Fisher information of the
next-token distribution with respect to the output of every o_proj and down_proj, over the calibration tokens.

For a small change e of a module's output at one token, the KL divergence from the dense model's next-token
distributions grows by about 1/2 e^T F e, where F = E[g g^T] and g is the gradient of -log p(y) with respect to
that output, y sampled from the model's own distribution (the true Fisher, not the empirical one), the same
draws whatever the batching or the number of processes. One forward
and backward pass of the whole model per calibration batch; no parameter gradients are kept.

`fraction` < 1 estimates F from that share of the windows (each drawn by a hash of its tokens, so again the
same whatever the batching; all of them if none is drawn): the others, when their inputs are still to be
recorded, only run through the decoder, without the vocabulary projection or a backward pass, which are most
of the cost on small models with large vocabularies.

`streamed_output_fisher` computes the same F one decoder layer at a time, for models streamed from disk
(`--offload`): forward, layer by layer, keeping each layer's input hidden states (in host memory, or in files of
a scratch folder once they pass a share of the memory available); the head's gradient; then back from the last
layer, each layer's forward recomputed from its saved input and its output gradient propagated through it.
Device memory holds one layer and its activations.
"""

from __future__ import annotations

import shutil
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from ..model.arch import ArchSpec, decoder_layers
from ..errors import DiskFullError
from ..math.stats import Covariance, SplitCovariance
from .walk import LayerProvider, capture_inputs, forward_all, layer_output, output_projections, record_inputs

# the streamed Fisher keeps the layers' saved inputs in host memory up to this share of the memory available
# when it starts, and spills the rest to its scratch folder
HIDDEN_MEMORY_SHARE = 0.5


@contextmanager
def _grad_recorders(model: nn.Module, spec: ArchSpec, sums: list[dict[str, torch.Tensor]]):
    """While the block runs, each projection's output gradient g adds g^T g (over its tokens) to its sum, and
    the embeddings' output requires grad so the graph reaches every layer without parameter gradients."""
    with ExitStack() as stack:
        for layer, sink in zip(decoder_layers(model, spec), sums):
            stack.enter_context(_record_output_grads(output_projections(layer, spec), sink))
        stack.callback(model.get_input_embeddings().register_forward_hook(
            lambda m, a, out: out.requires_grad_(True) if torch.is_grad_enabled() else None).remove)
        yield


def _window_draws(ids: torch.Tensor, key: tuple[int, ...], n: int) -> torch.Tensor:
    """n uniform numbers per window [B, n], from a generator seeded by `key` and the window's own tokens.
    The key holds integers only: Python salts the hashes of strings per process, not those of ints."""
    return torch.stack([torch.rand(n, generator=torch.Generator().manual_seed(hash((*key, *w.tolist())) & 0x7FFFFFFF),
                                   dtype=torch.float64) for w in ids.cpu()])


def window_uniforms(ids: torch.Tensor, seed: int) -> torch.Tensor:
    """One uniform number per token [B, L], drawn from a generator seeded by the seed and the window's own
    tokens: any split of the windows over batches or processes draws the same labels."""
    return _window_draws(ids, (seed,), ids.shape[1])


def window_selected(ids: torch.Tensor, seed: int, fraction: float) -> torch.Tensor:
    """Which windows [B] (bool) estimate the Fisher when only `fraction` of them do: each with that
    probability, by a draw seeded from the seed and the window's own tokens (not those of its labels)."""
    if fraction >= 1:
        return torch.ones(ids.shape[0], dtype=torch.bool)
    return _window_draws(ids, (seed, -1), 1)[:, 0] < fraction


def sample_labels(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One token per row of probabilities [N, V], drawn by inverting the cumulative distribution at the
    uniform numbers u [N]."""
    cdf = probs.cumsum(-1)
    u = u.reshape(-1, 1).to(cdf.device, cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, u).flatten().clamp_(max=probs.shape[-1] - 1)


def _logit_gradient(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """d(-log p(y))/d logits = softmax(logits) - onehot(y) for every row of logits [N, V], y drawn from the
    softmax at the uniform numbers u [N] (float32)."""
    grad = logits.detach().float().softmax(-1)
    labels = sample_labels(grad, u)
    grad[torch.arange(grad.shape[0], device=grad.device), labels] -= 1
    return grad


def _drawn(batches: list[torch.Tensor], seed: int, fraction: float, like: torch.Tensor) -> list[torch.Tensor]:
    """Per batch, which windows estimate the Fisher (`window_selected`); every one when no rank drew any."""
    picks = [window_selected(ids, seed, fraction) for ids in batches]
    if distributed.reduce_count(sum(int(p.sum()) for p in picks), like) == 0:
        picks = [torch.ones_like(p) for p in picks]  # too few windows to draw from: every one counts
    return picks


def _hold_rows(inputs: list[dict[str, Covariance]] | None, rows: torch.Tensor | None) -> None:
    """Tell the split sinks which of this process's windows the next forward holds (None: the next ones)."""
    for sinks in inputs or []:
        for sink in sinks.values():
            if isinstance(sink, SplitCovariance):
                sink.rows = rows


def output_fisher(model: nn.Module, spec: ArchSpec, batches: list[torch.Tensor], seed: int = 0,
                  progress: bool = False, inputs: list[dict[str, Covariance]] | None = None,
                  fraction: float = 1.0) -> list[dict[str, torch.Tensor]]:
    """Per decoder layer, {"attn": F of o_proj's output, "mlp": F of down_proj's output}, each [d, d] float64,
    averaged over the calibration tokens of every rank (of the windows `window_selected` draws when `fraction`
    < 1). `inputs` (per layer, {"attn": ..., "mlp": ...}), if given, also receive the projections' inputs of
    all this rank's windows on the way: the dense model's covariances without a pass of their own."""
    layers = decoder_layers(model, spec)
    device = model.get_input_embeddings().weight.device
    sums = [{name: torch.zeros(p.out_features, p.out_features, dtype=torch.float64, device=device)
             for name, p in output_projections(layer, spec).items()} for layer in layers]
    tokens = torch.zeros(1, dtype=torch.float64)
    try:  # gradients reach the activations only: no weight gradients computed or left behind
        with _frozen(model), torch.enable_grad(), _grad_recorders(model, spec, sums), ExitStack() as recording:
            for layer, sinks in zip(layers, inputs or []):
                recording.enter_context(record_inputs(output_projections(layer, spec), sinks))
            picks = _drawn(batches, seed, fraction, tokens)
            offset = 0  # windows before this batch
            for ids, picked in tqdm(list(zip(batches, picks)), desc="obs: output sensitivity", disable=not progress,
                                    unit="batch"):
                rows = offset + torch.arange(ids.shape[0])
                offset += ids.shape[0]
                if picked.any():
                    _hold_rows(inputs, rows[picked])
                    sub = ids[picked]
                    logits = model(input_ids=sub.to(device), use_cache=False).logits  # [B, L, V]
                    flat = logits.reshape(-1, logits.shape[-1])
                    flat.backward(_logit_gradient(flat, window_uniforms(sub, seed)).to(flat.dtype))
                    tokens += flat.shape[0]
                if inputs and not picked.all():  # the other windows' inputs, through the decoder only
                    _hold_rows(inputs, rows[~picked])
                    with torch.no_grad():
                        model.base_model(input_ids=ids[~picked].to(device), use_cache=False)
    finally:
        _hold_rows(inputs, None)
    distributed.all_reduce_sum_(tokens, *[s for layer in sums for s in layer.values()])
    return [{name: (s / tokens.item()).cpu() for name, s in layer.items()} for layer in sums]


def _record_output_grads(modules: dict[str, nn.Module], sums: dict[str, torch.Tensor]):
    """While the block runs, each module's output gradient g adds g^T g (over its tokens) to its sum."""
    stack = ExitStack()

    def hook(sink):
        def on_grad(g) -> None:
            sink.add_(_gram(g).to(sink.device))

        def forward_hook(module, args, out):
            if out.requires_grad:
                out.register_hook(on_grad)
        return forward_hook

    for name, module in modules.items():
        stack.callback(module.register_forward_hook(hook(sums[name])).remove)
    return stack


def _gram(g: torch.Tensor) -> torch.Tensor:
    g = g.detach().reshape(-1, g.shape[-1]).to(torch.float32)
    return g.T @ g  # float32 products, float64 sums


@contextmanager
def _frozen(module: nn.Module):
    """No parameter gradients while the block runs (only the activations' are wanted)."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


@contextmanager
def _decoder_replaced_by(model: nn.Module, spec: ArchSpec, hidden: torch.Tensor):
    """While the block runs, the decoder layers pass their input through and the last one returns `hidden`:
    a forward of the model is then the head (final norm, vocabulary projection, any scaling) on `hidden`."""
    layers = decoder_layers(model, spec)

    def passthrough(*args, **kwargs):
        return args[0] if args else kwargs["hidden_states"]

    for layer in layers:
        layer.forward = passthrough
    layers[-1].forward = lambda *args, **kwargs: hidden
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


class _SavedInputs:
    """Each layer's input hidden states (one tensor per batch), kept for the backward walk: in host memory
    while they fit in `memory` bytes, then in one file per layer under `scratch` (removed when read back)."""

    def __init__(self, memory: int | None, scratch: Path | None):
        self.memory, self.scratch = memory, scratch
        self.items: dict[int, list[torch.Tensor] | Path] = {}

    def put(self, idx: int, hidden: list[torch.Tensor]) -> None:
        cpu = [h.detach().to("cpu", copy=True) for h in hidden]
        size = sum(h.numel() * h.element_size() for h in cpu)
        if self.scratch is None or self.memory is None or size <= self.memory:
            self.items[idx] = cpu
            self.memory = None if self.memory is None else self.memory - size
            return
        self.scratch.mkdir(parents=True, exist_ok=True)
        path = self.scratch / f"layer-{idx}.pt"
        try:
            torch.save(cpu, path)
        except OSError as e:
            path.unlink(missing_ok=True)
            free = shutil.disk_usage(self.scratch).free
            raise DiskFullError(f"the disk filled while spilling the Fisher pass's saved hidden states to "
                                f"{self.scratch}: a layer needs about {size / 2**20:.0f} MiB and "
                                f"{free / 2**20:.0f} MiB is free there; use fewer calibration windows, more memory, "
                                "or free some space") from e
        self.items[idx] = path

    def pop(self, idx: int, device) -> list[torch.Tensor]:
        item = self.items.pop(idx)
        if isinstance(item, Path):
            hidden = torch.load(item)
            item.unlink()
        else:
            hidden = item
        return [h.to(device) for h in hidden]

    def close(self) -> None:
        self.items.clear()
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)


def streamed_output_fisher(model: nn.Module, spec: ArchSpec, batches: list[torch.Tensor], layers: LayerProvider,
                           seed: int = 0, progress: bool = False, fraction: float = 1.0,
                           scratch: Path | None = None, memory: int | None = None) -> list[dict[str, torch.Tensor]]:
    """`output_fisher`'s result, computed one decoder layer at a time through `layers` (module docstring).
    `scratch`: a folder for the saved inputs that do not fit in `memory` bytes (default: HIDDEN_MEMORY_SHARE of
    the memory available; without a scratch folder everything stays in memory); it is removed at the end."""
    device = model.get_input_embeddings().weight.device
    tokens = torch.zeros(1, dtype=torch.float64)
    picks = _drawn(batches, seed, fraction, tokens)
    chosen = [ids[p] for ids, p in zip(batches, picks) if p.any()]
    if memory is None and scratch is not None:
        from ..model.devices import available_bytes
        free = available_bytes(torch.device("cpu"))
        memory = None if free is None else int(HIDDEN_MEMORY_SHARE * free)
    saved = _SavedInputs(memory, scratch)
    sums: list[dict[str, torch.Tensor]] = [{} for _ in range(len(layers))]
    bar = tqdm(total=2 * len(layers) + 1, desc="obs: output sensitivity (streamed)", disable=not progress,
               unit="pass")
    try:
        inputs, kwargs = capture_inputs(model, spec, chosen) if chosen else ([], [[] for _ in range(len(layers))])
        for idx in range(len(layers)):  # forward: every layer's input kept
            inputs[:] = [(hidden, kw) for (hidden, _), kw in zip(inputs, kwargs[idx])]
            saved.put(idx, [hidden for hidden, _ in inputs])
            with layers.open(idx) as layer:
                forward_all(layer, inputs, keep=True)
            bar.update()
        grads = []
        with layers.open_head() as head, _frozen(head), torch.enable_grad():  # the head's gradient
            for (hidden, _), ids in zip(inputs, chosen):
                hidden = hidden.detach().requires_grad_(True)
                with _decoder_replaced_by(head, spec, hidden):
                    logits = head(input_ids=ids.to(device), use_cache=False).logits
                flat = logits.reshape(-1, logits.shape[-1])
                flat.backward(_logit_gradient(flat, window_uniforms(ids, seed)).to(flat.dtype))
                grads.append(hidden.grad.detach())
                tokens += flat.shape[0]
        del inputs
        bar.update()
        for idx in reversed(range(len(layers))):  # backward: each layer's forward again, then its gradient
            hidden = saved.pop(idx, device)
            with layers.open(idx) as layer, _frozen(layer), torch.enable_grad():
                proj = output_projections(layer, spec)
                sums[idx] = {name: torch.zeros(p.out_features, p.out_features, dtype=torch.float64, device=device)
                             for name, p in proj.items()}
                with _record_output_grads(proj, sums[idx]):
                    for b, (h, kw) in enumerate(zip(hidden, kwargs[idx])):
                        h.requires_grad_(True)
                        layer_output(layer(h, **kw)).backward(grads[b])
                        grads[b] = h.grad.detach()
            # a finished layer's sums leave the device, which then holds about one layer and its activations
            distributed.all_reduce_sum_(*sums[idx].values())
            sums[idx] = {name: s.cpu() for name, s in sums[idx].items()}
            bar.update()
    finally:
        bar.close()
        saved.close()
    distributed.all_reduce_sum_(tokens)
    return [{name: s / tokens.item() for name, s in layer.items()} for layer in sums]


def weighting(fisher: torch.Tensor, ridge: float) -> torch.Tensor:
    """F^(1/2) with a ridge (a fraction of F's mean eigenvalue) so directions the sample missed still count:
    the least-squares error of W' = weighting @ W is the Fisher-weighted error of W."""
    f = fisher.to(torch.float64)
    f = f + ridge * f.diagonal().mean().clamp_min(1e-30) * torch.eye(f.shape[0], dtype=torch.float64)
    vals, vecs = torch.linalg.eigh(f)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T
