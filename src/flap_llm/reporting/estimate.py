"""Know before you run: the peak host and device memory and the work of a prune or a heal, from the model's
config alone (`flap-llm prune --dry-run`, `flap-llm heal --dry-run`). No weight is read: the shapes come from
the config, as the model would be built on the meta device.

The peak is a sum of named parts (what is resident at the most expensive moment of the run), each a plain
formula of the shapes, the dtype, the calibration size and the method; `parts` lists them so that a surprise can
be traced. The formulas were checked against measured peak RSS (benchmarks/peak_memory.py; BENCHMARKS.md,
"Know before you run").
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..model.arch import Dims, config_head_dim
from ..config import PruneConfig
from ..healing.distill import teacher_dtype
from ..errors import FlapError
from ..methods import registry

GiB = 2**30
# python, torch, transformers, the tokenizer and the texts: the resident set before any model (measured: 0.45-0.6
# GiB on the CPU runs)
RUNTIME_BYTES = int(0.5 * GiB)


@dataclass
class Shapes:
    """What the estimates need of a model's config."""

    n_layers: int
    hidden: int
    d_ff: int
    n_heads: int
    n_kv: int
    head_dim: int
    vocab: int
    tied: bool
    layer_params: list[int]  # per decoder layer (pruned layers: their own widths)

    @classmethod
    def of(cls, config) -> "Shapes":
        c = config
        n_heads = c.num_attention_heads
        n_kv = getattr(c, "num_key_value_heads", None) or n_heads
        hd = config_head_dim(c)
        h, f = c.hidden_size, c.intermediate_size
        pruned = getattr(c, "flap_layers", None)
        layers = []
        for i in range(c.num_hidden_layers):
            q, kv, ff = (n_heads, n_kv, f) if not pruned else (
                pruned[i]["num_attention_heads"], pruned[i]["num_key_value_heads"], pruned[i]["intermediate_size"])
            layers.append(2 * q * hd * h + 2 * kv * hd * h + 3 * ff * h + 4 * h)
        return cls(c.num_hidden_layers, h, f, n_heads, n_kv, hd, c.vocab_size,
                   bool(getattr(c, "tie_word_embeddings", False)), layers)

    @property
    def dims(self) -> Dims:
        return Dims(self.n_layers, self.n_heads, self.n_kv, self.head_dim, self.hidden, self.d_ff)

    @property
    def embed_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def head_params(self) -> int:
        return 0 if self.tied else self.vocab * self.hidden

    @property
    def params(self) -> int:
        return self.embed_params + self.head_params + sum(self.layer_params) + self.hidden


@dataclass
class CostInputs:
    """What a method's dry-run cost (Method.cost) is a formula of."""

    shapes: Shapes
    tokens: int  # calibration tokens
    seqlen: int
    batch_size: int  # windows per forward pass
    bytes_per_weight: int
    device: str  # the device the run would use
    offload: bool  # streamed layer by layer from disk

    @staticmethod
    def available(device: str) -> int | None:
        """Memory free now on `device` (None: unknown here)."""
        return _available(device)


@dataclass
class Cost:
    """What a method adds to the shared calibration walk: memory parts at its peak (bytes), its passes over the
    calibration windows, extra work to report, and which parts stay in host memory on a GPU."""

    parts: dict[str, int] = field(default_factory=dict)
    forward: int = 1
    backward: int = 0
    work: dict = field(default_factory=dict)
    host: set[str] = field(default_factory=set)


@dataclass
class Estimate:
    peak_host_bytes: int
    peak_device_bytes: int
    parts: dict[str, int]  # what the peak is made of (bytes)
    work: dict
    advice: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"peak_host_bytes": self.peak_host_bytes, "peak_device_bytes": self.peak_device_bytes,
                "parts": self.parts, "work": self.work, "advice": self.advice}

    def summary(self) -> str:
        lines = [f"peak host memory   {self.peak_host_bytes / GiB:8.2f} GiB",
                 f"peak device memory {self.peak_device_bytes / GiB:8.2f} GiB"]
        lines += [f"  {name:<34} {b / GiB:8.2f} GiB" for name, b in self.parts.items() if b]
        lines += [f"{k}: {v}" for k, v in self.work.items()]
        lines += [f"advice: {a}" for a in self.advice]
        return "\n".join(lines)


def _dtype_bytes(dtype: torch.dtype | None) -> int:
    return torch.finfo(dtype or torch.float32).bits // 8


def _split(parts: dict[str, int], on_device: set[str], device: str) -> tuple[int, int]:
    """(host, device) peaks: on the CPU everything is host memory."""
    total = sum(parts.values())
    if device == "cpu":
        return total, 0
    dev = sum(b for k, b in parts.items() if k in on_device)
    return total - dev, dev


def _available(device: str) -> int | None:
    """Memory free now on the device the run would use (None: unknown here, e.g. no GPU on this machine)."""
    from ..model.devices import available_bytes
    if device.startswith("cuda") and not torch.cuda.is_available():
        return None
    return available_bytes(torch.device(device if device.startswith("cuda") else "cpu"))


def prune_estimate(config, prune: PruneConfig, *, nsamples: int, seqlen: int, batch_size: int = 8,
                   dtype: torch.dtype | None = None, device: str = "cpu", offload: bool = False) -> Estimate:
    """The peak memory and work of `prune` (or `prune_offloaded`) on a model of this config."""
    s = Shapes.of(config)
    if getattr(config, "flap_layers", None):
        raise FlapError("this checkpoint is already pruned; estimate the prune of the dense model it came from")
    b = _dtype_bytes(dtype)
    tokens = nsamples * seqlen
    batch_size = min(batch_size, nsamples)
    h, f = s.hidden, s.d_ff
    largest = max(s.layer_params) * b
    parts = {"runtime (python, torch, tokenizer)": RUNTIME_BYTES,
             "calibration windows (the walk's hidden states)": tokens * h * b,
             "one layer's work on a batch": batch_size * seqlen * (3 * f + 6 * h) * b}
    if offload:
        parts["embeddings"] = s.embed_params * b  # an untied head is read only for obs's Fisher pass
        parts["one decoder layer read, one written"] = 2 * largest
    else:
        parts["model weights"] = s.params * b
    cost = registry.get(prune.method).cost(CostInputs(s, tokens, seqlen, batch_size, b, device, offload),
                                           prune.options)
    parts.update(cost.parts)
    passes = {"forward": cost.forward, "backward": cost.backward}
    on_device = set(parts) - {"runtime (python, torch, tokenizer)"} - cost.host
    host, dev = _split(parts, on_device, device)
    work = {"passes": passes, "calibration tokens": tokens, **cost.work}
    est = Estimate(host, dev, parts, work)
    est.advice = _prune_advice(est, s, prune, nsamples, device, offload, b)
    return est


def _prune_advice(est: Estimate, s: Shapes, prune: PruneConfig, nsamples: int, device: str, offload: bool,
                  b: int) -> list[str]:
    advice = []
    host_free, dev_free = _available("cpu"), _available(device) if device != "cpu" else None
    over_host = host_free is not None and est.peak_host_bytes > host_free
    over_dev = dev_free is not None and est.peak_device_bytes > dev_free
    if not (over_host or over_dev):
        return ["fits in the memory available now"] if host_free is not None else []
    where = "host" if over_host else "device"
    advice.append(f"needs more {where} memory than is available now "
                  f"({(host_free if over_host else dev_free) / GiB:.1f} GiB)")
    if not offload and est.parts.get("model weights", 0) > 0.3 * (host_free if over_host else dev_free or 1):
        advice.append("--offload streams the model from disk one layer at a time (FLAP, FLAP + lsq, obs)")
    if b == 4:
        advice.append("--dtype bfloat16 halves the weights and activations")
    if est.parts.get("calibration windows (the walk's hidden states)", 0) > 0.2 * est.peak_host_bytes:
        advice.append(f"fewer calibration windows (--nsamples {max(32, nsamples // 4)}) shrink the walk's hidden "
                      "states")
    return advice


def heal_estimate(student_config, teacher_config, *, batch_size: int, seqlen: int, method: str = "full",
                  lora_rank: int = 16, world: int = 1, shard: bool = False, dtype: torch.dtype | None = None,
                  device: str = "cpu") -> Estimate:
    """The peak memory (per rank) and work of `heal` on a student and teacher of these configs."""
    st, te = Shapes.of(student_config), Shapes.of(teacher_config)
    b = _dtype_bytes(dtype)
    decoder = sum(st.layer_params)
    per_rank = batch_size // max(world, 1)
    share = 1 / world if shard and world > 1 else 1
    if method == "lora":
        trained = st.n_layers * 7 * lora_rank * 2 * st.hidden  # adapters on every projection (about)
        decoder_weights = decoder * b * share
    else:
        trained = decoder
        decoder_weights = 0
    parts = {"runtime (python, torch, tokenizer)": RUNTIME_BYTES,
             "teacher weights (bf16 on a GPU)": te.params * _dtype_bytes(teacher_dtype(device, dtype)),
             "student embeddings and head": (st.embed_params + st.head_params) * b,
             "student decoder (frozen under LoRA)": decoder_weights,
             "trained weights": int(trained * 4 * share),
             "their gradients": int(trained * 4 * share),
             "AdamW state (two moments)": int(trained * 8 * share),
             "activations of a micro-batch (student, kept for backward)":
                 per_rank * seqlen * st.n_layers * (10 * st.hidden + 4 * st.d_ff + st.n_heads * seqlen) * 4,
             "logits of teacher and student, and the loss's": per_rank * seqlen * st.vocab * 4 * 5}
    host, dev = _split(parts, set(parts) - {"runtime (python, torch, tokenizer)"}, device)
    work = {"trained parameters": trained, "per-rank micro-batch": per_rank,
            "mode": ("sharded (FSDP2)" if shard else "replicated (DDP)") if world > 1 else "one process"}
    est = Estimate(host, dev, parts, work)
    free = _available(device)
    peak = dev if device != "cpu" else host
    if free is not None and peak > free:
        est.advice.append(f"needs more memory than is available now ({free / GiB:.1f} GiB)")
        if method == "full":
            est.advice.append("--method lora trains adapters instead of every weight: no full gradients or AdamW "
                              "state")
        if not shard:
            est.advice.append("torchrun with --shard splits the trained weights, gradients and AdamW state over "
                              "the processes")
        est.advice.append("a smaller --batch-size shrinks the activations and logits")
    elif free is not None:
        est.advice.append("fits in the memory available now")
    return est


def config_of(name: str | None):
    """The config of --model without reading any weight: a model folder's or pruned checkpoint's config.json,
    a GGUF file's metadata (the built-in model's too), or a hub id's config."""
    from pathlib import Path

    from transformers import AutoConfig

    from ..model.models import DEFAULT_MODEL, builtin_gguf
    name = name or DEFAULT_MODEL
    path = builtin_gguf() if name == DEFAULT_MODEL else Path(name).expanduser()
    try:
        if path.suffix == ".gguf":
            if not path.is_file():
                raise FlapError(f"model file {path} does not exist")
            return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        if path.is_dir() and not (path / "config.json").is_file():
            raise FlapError(f"{path} has no config.json; it is not a Hugging Face model folder")
        source = str(path) if path.exists() else name
        _check_shape_fields(source)
        return AutoConfig.from_pretrained(source)
    except FlapError:
        raise
    except Exception as e:
        raise FlapError(f"could not read the config of {name}: {str(e).splitlines()[0][:200]}") from e


# The fields an estimate reads; transformers fills any that a config.json lacks with one family's defaults (a
# Llama-7B shape), so an estimate made without them would describe a model that does not exist.
SHAPE_FIELDS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "vocab_size")


def _check_shape_fields(source: str) -> None:
    """Raise FlapError naming the shape fields that `source`'s own config.json lacks."""
    from transformers import PretrainedConfig
    raw, _ = PretrainedConfig.get_config_dict(source)
    text = raw.get("text_config") or raw  # a multimodal config keeps the language model's shape there
    missing = [k for k in SHAPE_FIELDS if k not in text]
    if missing:
        raise FlapError(f"the config of {source} lacks {', '.join(missing)}, which the estimate needs; give the "
                        "model's complete config.json")
