"""Heal: a short distillation from the dense model (the teacher) into the pruned one (the student).

The student keeps its pruned shapes; only its decoder is trained (fully, or through LoRA adapters that are
merged back into the weights), so the result is an ordinary pruned checkpoint. The loss is the KL divergence
between the teacher's and the student's next-token distributions at temperature T (times T^2, so its
gradients keep their scale), optionally mixed with the language-model loss on the same windows. AdamW with
linear warmup and cosine decay; gradient accumulation; bf16 autocast and gradient checkpointing on GPU;
torch.distributed when a process group is active, each rank taking its share of every batch: the student
replicated on every rank (DistributedDataParallel), or with `shard=True` sharded over the ranks (FSDP2's
`fully_shard`, one unit per decoder layer and one for the final norm), so that each rank holds its share of the
trained weights, their gradients and the optimizer state (resume checkpoints then go through
torch.distributed.checkpoint). The teacher stays whole on every rank, inference only; on a GPU the command
line loads it in bf16 (`teacher_dtype`), since its forward runs under bf16 autocast there anyway.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..calibration import distributed
from ..model.arch import architecture_of, decoder_layers, dims_of, get_module, spec_of
from ..errors import FlapError
from ..calibration.walk import check_token_ids

HEAL_METHODS = ("full", "lora")
STATE_FILE = "heal-state.pt"
SHARDED_STATE = "heal-state.dcp"  # shard=True: a torch.distributed.checkpoint folder


@dataclass(frozen=True)
class HealConfig:
    """How to heal.

    tokens: training tokens (window positions) in all; the run takes ceil(tokens / tokens-per-step) steps.
    lr: peak learning rate (None: 5e-5 for full fine-tuning, 1e-3 for LoRA).
    method: "full" trains every decoder weight; "lora" trains rank-`lora_rank` adapters on every decoder
        projection and merges them into the weights at the end.
    temperature: of the distillation softmax. kd_weight: the KL's weight; (1 - kd_weight) goes to the
        language-model loss.
    batch_size: windows per micro-batch; grad_accum: micro-batches per optimizer step.
    warmup: fraction of the steps with a linear warmup; then cosine decay to zero.
    checkpoint_every: optimizer steps between resume checkpoints (0: none), written to `checkpoint_dir`.
    shard: under torch.distributed, shard the student's decoder, gradients and optimizer state over the ranks
        (FSDP2) instead of replicating them (DDP).
    """

    tokens: int = 250_000
    lr: float | None = None
    method: str = "full"
    temperature: float = 1.0
    kd_weight: float = 1.0
    batch_size: int = 8
    grad_accum: int = 1
    warmup: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lora_rank: int = 16
    lora_alpha: float = 32.0
    seed: int = 0
    checkpoint_every: int = 0
    shard: bool = False

    def __post_init__(self) -> None:
        if self.method not in HEAL_METHODS:
            raise FlapError(f"unknown heal method {self.method!r}; choose one of: {', '.join(HEAL_METHODS)}")
        for name in ("tokens", "batch_size", "grad_accum", "lora_rank"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise FlapError(f"{name} must be a positive integer, got {v!r}")
        if self.lr is not None and not self.lr > 0:
            raise FlapError(f"lr must be positive, got {self.lr}")
        if not self.temperature > 0:
            raise FlapError(f"temperature must be positive, got {self.temperature}")
        if not 0.0 <= self.kd_weight <= 1.0:
            raise FlapError(f"kd_weight must be in [0, 1], got {self.kd_weight}")
        if not 0.0 <= self.warmup < 1.0:
            raise FlapError(f"warmup must be a fraction in [0, 1), got {self.warmup}")
        if not isinstance(self.shard, bool):
            raise FlapError(f"shard must be True or False, got {self.shard!r}")
        if self.checkpoint_every < 0:
            raise FlapError(f"checkpoint_every must be 0 (none) or a number of steps, got {self.checkpoint_every}")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (5e-5 if self.method == "full" else 1e-3)

    def to_dict(self) -> dict:
        return {**asdict(self), "lr": self.learning_rate}


@dataclass
class HealResult:
    config: HealConfig
    steps: int
    tokens: int  # tokens trained on (all ranks)
    seconds: float
    loss: list[float] = field(default_factory=list)  # per optimizer step, the loss being minimized
    kl: list[float] = field(default_factory=list)  # per step, KL(teacher || student) at temperature 1
    merge_error: float | None = None  # LoRA: max |logits after merging - logits of the adapter model|
    state_bytes: int | None = None  # this rank's trained weights, their gradients and the optimizer state

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")

    def to_dict(self) -> dict:
        return {"config": self.config.to_dict(), "steps": self.steps, "tokens": self.tokens,
                "seconds": self.seconds, "tokens_per_s": self.tokens_per_s, "loss": self.loss, "kl": self.kl,
                "merge_error": self.merge_error, "state_bytes": self.state_bytes}


def teacher_dtype(device: str | torch.device, dtype):
    """The dtype to hold the teacher in: bf16 on a GPU, where `heal` runs its forward under bf16 autocast (the
    products are bf16 either way, and its weights take half the memory of fp32); elsewhere `dtype`, the
    student's (as given: a torch.dtype or a name)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else dtype


def teacher_copy(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of the dense `model` to teach its pruned self, in `dtype` (`teacher_dtype`): each weight is
    converted as it is copied, so the model is never held twice at its own width."""
    memo = {id(p): nn.Parameter(p.detach().to(dtype, copy=True), requires_grad=False) for p in model.parameters()}
    return copy.deepcopy(model, memo).to(dtype)


def check_pair(student: nn.Module, teacher: nn.Module) -> None:
    """The student must be a model pruned (mode "prune") from this very teacher."""
    arch_s, arch_t = architecture_of(student), architecture_of(teacher)
    if arch_s != arch_t:
        raise FlapError(f"the teacher is a {arch_t} but the student a {arch_s}; give the dense model the student "
                        "was pruned from")
    if getattr(teacher.config, "flap_layers", None):
        raise FlapError("the teacher is itself pruned; give the dense model the student was pruned from")
    if not getattr(student.config, "flap_layers", None):
        raise FlapError("the student is not pruned; heal a model pruned by flap-llm (or prune with --heal-tokens)")
    if getattr(student.config, "flap_mode", "prune") != "prune":
        raise FlapError("the student was pruned with mode 'mask' (zeroed weights would grow back); prune with "
                        "mode 'prune'")
    kept = getattr(student.config, "flap_kept_layers", None)  # depth: the student has fewer layers
    s_dims = dims_of(student)
    if kept:
        s_dims = dataclasses.replace(s_dims, n_layers=dims_of(teacher).n_layers if max(kept) < dims_of(teacher).n_layers
                                     else s_dims.n_layers)
    if s_dims != dims_of(teacher) or student.config.vocab_size != teacher.config.vocab_size:
        raise FlapError("the teacher's shapes or vocabulary differ from the student's dense shapes; give the dense "
                        "model the student was pruned from")
    spec = spec_of(student)
    e_s, e_t = get_module(student, spec.embed).weight, get_module(teacher, spec.embed).weight
    # compared in the teacher's dtype: a bf16 teacher holds the student's embeddings rounded
    if e_s.shape != e_t.shape or not torch.equal(e_s.detach().cpu().to(e_t.dtype), e_t.detach().cpu()):
        raise FlapError("the student's embeddings differ from the teacher's: it was not pruned from this model; "
                        "give the dense model the student was pruned from")


def _check_data(data: torch.Tensor, vocab: int) -> torch.Tensor:
    check_token_ids(data, vocab, "heal data", min_length=2)
    return data.long()


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, ids: torch.Tensor, temperature: float,
                 kd_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, KL at T=1). logits: [B, L, V]; ids: [B, L]. KL(teacher || student) is averaged over every
    position; the LM loss over every predicted token."""
    s = student_logits.float()
    t = teacher_logits.float()
    v = s.shape[-1]
    log_ps = F.log_softmax(s / temperature, -1).reshape(-1, v)
    log_pt = F.log_softmax(t / temperature, -1).reshape(-1, v)
    kl_t = F.kl_div(log_ps, log_pt, log_target=True, reduction="batchmean") * temperature ** 2
    loss = kd_weight * kl_t
    if kd_weight < 1.0:
        lm = F.cross_entropy(s[:, :-1].reshape(-1, v), ids[:, 1:].reshape(-1))
        loss = loss + (1.0 - kd_weight) * lm
    with torch.no_grad():
        kl1 = kl_t if temperature == 1.0 else F.kl_div(F.log_softmax(s, -1).reshape(-1, v),
                                                         F.log_softmax(t, -1).reshape(-1, v),
                                                         log_target=True, reduction="batchmean")
    return loss, kl1.detach()


def _trainable_linears(student: nn.Module) -> list[str]:
    """Names of every non-empty Linear of the decoder layers (LoRA targets)."""
    spec = spec_of(student)
    names = []
    for i, layer in enumerate(decoder_layers(student, spec)):
        for name, module in layer.named_modules():
            if isinstance(module, nn.Linear) and module.in_features > 0 and module.out_features > 0:
                names.append(f"{spec.layers}.{i}.{name}")
    return names


def _decoder_params(student: nn.Module) -> dict[str, nn.Parameter]:
    """Full fine-tuning trains the decoder layers and the final norm; embeddings and head stay (often tied).
    Left out: empty weights, and the attention's input norm in a layer that kept no head (its output feeds
    nothing, so it gets no gradient, which DistributedDataParallel refuses)."""
    from ..model.modeling_flap import ConstantAttention
    spec = spec_of(student)
    unused = set()
    for layer in decoder_layers(student, spec):
        if isinstance(get_module(layer, spec.attn), ConstantAttention):
            unused.update(id(p) for p in get_module(layer, spec.attn_norm).parameters())
    out = {}
    for prefix in (spec.layers, spec.final_norm):
        for name, p in get_module(student, prefix).named_parameters():
            if p.numel() > 0 and id(p) not in unused:
                out[f"{prefix}.{name}"] = p
    return out


def _schedule(step: int, total: int, warmup_steps: int) -> float:
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _window_order(n: int, steps_windows: int, seed: int) -> torch.Tensor:
    """The windows in training order: seeded permutations of all N, one after another."""
    g = torch.Generator().manual_seed(seed)
    reps = -(-steps_windows // n)
    return torch.cat([torch.randperm(n, generator=g) for _ in range(reps)])[:steps_windows]


def _save_state(path: Path, state: dict) -> None:
    from ..atomic import atomic_file
    with atomic_file(path, "the heal resume checkpoint", _tensor_bytes(state)) as tmp:
        torch.save(state, tmp)


def _tensor_bytes(obj) -> int:
    """Bytes of the tensors in a nested dict/list (what torch.save writes, less a small header)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _save_sharded_state(path: Path, sharded: "_Sharded", optimizer, progress_state: dict) -> None:
    """Every rank's shards through torch.distributed.checkpoint into a temporary folder beside `path`, which
    rank 0 then renames into place: an interrupted save leaves the previous checkpoint as it was."""
    import shutil

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    tmp = path.with_name(f".{path.name}.tmp-step{progress_state['step']}")
    if distributed.rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    dcp.save(sharded.state(optimizer), checkpoint_id=str(tmp))
    if distributed.rank() == 0:
        torch.save(progress_state, tmp / "progress.pt")
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if path.exists():
            path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def _load_sharded_state(path: Path, sharded: "_Sharded", optimizer) -> None:
    import torch.distributed.checkpoint as dcp
    state = sharded.state(optimizer)
    dcp.load(state, checkpoint_id=str(path))
    sharded.load(state, optimizer)


def _local_bytes(tensors) -> int:
    """Bytes these tensors take on this rank (a sharded tensor: its local shard)."""
    return sum((t.to_local() if hasattr(t, "to_local") else t).numel() * t.element_size() for t in tensors)


def _shard_units(runner: nn.Module, student: nn.Module) -> list[str]:
    """Names (in `runner`) of the modules FSDP2 shards: each decoder layer and the final norm."""
    spec = spec_of(student)
    wanted = {id(m) for m in decoder_layers(student, spec)} | {id(get_module(student, spec.final_norm))}
    return [name for name, m in runner.named_modules() if id(m) in wanted]


class _Sharded:
    """A copy of `runner` whose decoder layers and final norm are sharded over the ranks (FSDP2), the rest
    shared with `runner`; while it exists, `runner`'s own sharded parts hold no weights (meta), so each rank
    keeps only its share of them. `restore` gathers the trained weights back into `runner`, on every rank."""

    def __init__(self, runner: nn.Module, student: nn.Module, device: torch.device):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        from torch.distributed.fsdp import fully_shard
        self.runner, self.units = runner, _shard_units(runner, student)
        memo = {}
        for t in [*runner.parameters(), *runner.buffers()]:  # the copy's tensors start on the meta device
            meta = torch.empty_like(t, device="meta")
            memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
        self.model = copy.deepcopy(runner, memo)
        ours, theirs = dict(self.model.named_modules()), dict(runner.named_modules())
        inside = lambda name: any(name == u or name.startswith(u + ".") for u in self.units)  # noqa: E731
        for name, module in theirs.items():  # outside the units: the very same tensors
            if not inside(name):
                ours[name]._parameters.update(module._parameters)
                ours[name]._buffers.update(module._buffers)
        full, buffers = {}, {}
        for unit in self.units:
            for k, v in theirs[unit].state_dict(keep_vars=True).items():
                full[f"{unit}.{k}"] = v.detach()
            buffers.update({f"{unit}.{k}": b for k, b in theirs[unit].named_buffers()})
            # a layer with no head (or no MLP channel) left has empty weights, which FSDP2 cannot split: they
            # stay whole on every rank (they hold nothing to train)
            fully_shard(ours[unit], ignored_params={p for p in ours[unit].parameters() if p.numel() == 0})
            ours[unit].to_empty(device=device)
        set_model_state_dict(self.model, full, options=StateDictOptions(full_state_dict=True, strict=False))
        self.buffers = buffers
        self._copy_buffers(self.model)
        for unit in self.units:  # runner's copies of what is now sharded are freed
            theirs[unit].to("meta")

    def _copy_buffers(self, target: nn.Module) -> None:
        named = dict(target.named_buffers())
        with torch.no_grad():
            for name, b in self.buffers.items():
                if name in named:
                    named[name].copy_(b)

    def restore(self) -> None:
        """The trained weights, gathered whole, back into `runner` (on every rank)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True))
        mine = {k: v.detach().clone() for k, v in full.items()
                if any(k == u or k.startswith(u + ".") for u in self.units)}
        theirs = dict(self.runner.named_modules())
        for unit in self.units:
            prefix = unit + "."
            state = {k[len(prefix):]: v for k, v in mine.items() if k.startswith(prefix)}
            module = theirs[unit]
            flags = {n: p.requires_grad for n, p in module.named_parameters()}
            module.load_state_dict(state, strict=False, assign=True)
            for n, p in module.named_parameters():
                p.requires_grad_(flags.get(n, p.requires_grad))
            for name, b in list(module.named_buffers()):
                if b.is_meta:
                    owner = module.get_submodule(name.rpartition(".")[0]) if "." in name else module
                    owner._buffers[name.rpartition(".")[2]] = self.buffers[prefix + name].clone()
        self.model = None

    def state(self, optimizer) -> dict:
        """Model and optimizer state as this rank's shards (for torch.distributed.checkpoint)."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
        return {"model": get_model_state_dict(self.model), "optimizer": get_optimizer_state_dict(self.model, optimizer)}

    def load(self, state: dict, optimizer) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict
        set_model_state_dict(self.model, state["model"])
        set_optimizer_state_dict(self.model, optimizer, state["optimizer"])


def heal(student: nn.Module, teacher: nn.Module, data: torch.Tensor, config: HealConfig = HealConfig(), *,
         progress: bool = False, checkpoint_dir: str | Path | None = None, resume: bool = False) -> HealResult:
    """Distill `teacher` into the pruned `student`, in place, on the token windows `data` ([N, L]).

    checkpoint_dir: where resume checkpoints go (every config.checkpoint_every steps); with resume=True the
    run continues from the checkpoint there, with the same data order and schedule.
    Everything is validated before the first weight changes.
    """
    if not isinstance(config, HealConfig):
        raise FlapError("config must be a flap_llm.HealConfig")
    check_pair(student, teacher)
    data = _check_data(data, student.config.vocab_size)
    if config.shard and not distributed.active():
        raise FlapError("shard=True shards the student over the processes of torch.distributed; run under torchrun "
                        "with 2 or more processes (torchrun --nproc-per-node N -m flap_llm heal --shard ...), or "
                        "drop --shard")
    name = SHARDED_STATE if config.shard else STATE_FILE
    state_path = Path(checkpoint_dir) / name if checkpoint_dir is not None else None
    if resume and (state_path is None or not state_path.exists()):
        raise FlapError(f"nothing to resume: no {name} in {checkpoint_dir}")
    if config.checkpoint_every and state_path is None:
        raise FlapError("checkpoint_every needs a checkpoint_dir to write into")
    world, rank = distributed.world_size(), distributed.rank()
    if config.batch_size % world:
        raise FlapError(f"batch_size {config.batch_size} does not split over {world} processes; use a multiple")
    device = next(student.parameters()).device
    seqlen = data.shape[1]
    per_step = config.batch_size * config.grad_accum * seqlen
    total_steps = -(-config.tokens // per_step)
    order = _window_order(data.shape[0], total_steps * config.grad_accum * config.batch_size, config.seed)
    cuda = device.type == "cuda"

    teacher.eval()
    flags = {id(p): p.requires_grad for p in student.parameters()}
    for p in student.parameters():
        p.requires_grad_(False)
    peft_model = None
    if config.method == "lora":
        from peft import LoraConfig, get_peft_model
        peft_model = get_peft_model(student, LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha,
                                                        lora_dropout=0.0, bias="none",
                                                        target_modules=_trainable_linears(student)))
        params = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
        runner: nn.Module = peft_model
    else:
        params = _decoder_params(student)
        for p in params.values():
            p.requires_grad_(True)
        runner = student
    if cuda:
        student.gradient_checkpointing_enable()
    sharded = None
    if config.shard:  # each rank keeps its share of the trained weights; `runner` trains the sharded copy
        sharded = _Sharded(runner, student, device)
        runner = sharded.model
        params = {n: p for n, p in runner.named_parameters() if p.requires_grad}
    trainable = list(params.values())
    opt = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
    warmup_steps = max(1, round(config.warmup * total_steps)) if config.warmup > 0 else 0
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, total_steps, warmup_steps))
    if distributed.active() and sharded is None:
        from torch.nn.parallel import DistributedDataParallel
        runner = DistributedDataParallel(runner)
    result = HealResult(config, 0, 0, 0.0)
    start = 0
    if resume:
        state = torch.load(state_path / "progress.pt" if sharded is not None else state_path, map_location=device,
                           weights_only=False)
        if state["config"] != config.to_dict() or state["data_shape"] != list(data.shape):
            raise FlapError(f"the checkpoint in {checkpoint_dir} is from another heal configuration or data; "
                            "resume with the same settings, or start afresh")
        if sharded is not None:
            _load_sharded_state(state_path, sharded, opt)
        else:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(state["params"][name])
            opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start = state["step"]
        result.loss, result.kl = state["loss"], state["kl"]
    student.train()
    runner.train()
    t0 = time.perf_counter()
    tokens_done = 0
    completed = False
    bar = tqdm(range(start, total_steps), desc="heal", disable=not progress or rank != 0, unit="step",
               initial=start, total=total_steps)
    try:
        for step in bar:
            opt.zero_grad(set_to_none=True)
            step_loss = torch.zeros(2, dtype=torch.float64)
            for micro in range(config.grad_accum):
                k = (step * config.grad_accum + micro) * config.batch_size
                ids = data[order[k:k + config.batch_size]][rank::world].to(device)
                with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=cuda):
                    t_logits = teacher(ids, use_cache=False).logits
                with torch.autocast(device.type, torch.bfloat16, enabled=cuda):
                    s_logits = runner(input_ids=ids, use_cache=False).logits
                loss, kl = distill_loss(s_logits, t_logits, ids, config.temperature, config.kd_weight)
                (loss / config.grad_accum).backward()
                step_loss += torch.tensor([float(loss.detach()), float(kl)], dtype=torch.float64) / config.grad_accum
                tokens_done += ids.numel() * world
            if config.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
            opt.step()
            sched.step()
            distributed.all_reduce_sum_(step_loss)
            step_loss /= world
            result.loss.append(float(step_loss[0]))
            result.kl.append(float(step_loss[1]))
            elapsed = time.perf_counter() - t0
            bar.set_postfix(loss=f"{result.loss[-1]:.4f}", tok_s=f"{tokens_done / max(elapsed, 1e-9):.0f}")
            done = step + 1
            if config.checkpoint_every and done % config.checkpoint_every == 0 and done < total_steps:
                progress_state = {"step": done, "config": config.to_dict(), "data_shape": list(data.shape),
                                  "scheduler": sched.state_dict(), "loss": list(result.loss), "kl": list(result.kl)}
                if sharded is not None:  # every rank writes its shards
                    _save_sharded_state(state_path, sharded, opt, progress_state)
                elif rank == 0:
                    _save_state(state_path, {**progress_state,
                                             "params": {n: p.detach().cpu() for n, p in params.items()},
                                             "optimizer": opt.state_dict()})
        result.state_bytes = _local_bytes([*trainable, *(p.grad for p in trainable if p.grad is not None),
                                           *(v for st in opt.state.values() for v in st.values() if torch.is_tensor(v))])
        completed = True
    finally:
        if sharded is not None and completed:  # (after an error the ranks may not all get here: no collective)
            sharded.restore()
        student.eval()
        if cuda:
            student.gradient_checkpointing_disable()
        if peft_model is not None and not completed:
            peft_model.unload()  # interrupted: drop the adapters, the student keeps its own modules
        for p in student.parameters():
            p.requires_grad_(flags.get(id(p), True))
    result.seconds = time.perf_counter() - t0
    result.steps = total_steps - start
    result.tokens = tokens_done
    if peft_model is not None:
        probe = data[:1].to(device)
        with torch.no_grad():
            before = peft_model(input_ids=probe, use_cache=False).logits.float()
            peft_model.merge_and_unload()
            after = student(probe, use_cache=False).logits.float()
        result.merge_error = float((after - before).abs().max())
    return result
