"""The pruning report (a typed object, built once), its markdown and console renderings, and the
parameter accounting, versions and timings it holds."""

from __future__ import annotations

import dataclasses
import json
import platform
import time
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata

from torch import nn

from ..model.arch import ArchSpec, Dims, decoder_weight_params, model_params
from ..model.plan import PrunePlan


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("flap-llm", "torch", "transformers", "safetensors", "lm_eval"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def planned_decoder_params(plan: PrunePlan, dims: Dims) -> int:
    """Decoder attention+MLP weight parameters that the plan keeps."""
    hd, h = dims.head_dim, dims.hidden
    return sum(2 * len(lp.heads) * hd * h + 2 * len(lp.kv_heads) * hd * h + 3 * len(lp.channels) * h
               for lp in plan.layers)


def param_report(model: nn.Module, spec: ArchSpec, dims: Dims, plan: PrunePlan,
                 decoder_before: int, model_before: int, mode: str) -> dict:
    decoder_after = planned_decoder_params(plan, dims)
    removed = decoder_before - decoder_after
    model_after = model_params(model) if mode == "prune" else model_before - removed
    if mode == "prune":
        assert decoder_weight_params(model, spec) == decoder_after
    return {
        "decoder_before": decoder_before,
        "decoder_after": decoder_after,
        "decoder_removed_fraction": removed / decoder_before,
        "model_before": model_before,
        "model_after": model_after,
        "model_removed_fraction": (model_before - model_after) / model_before,
    }


def layer_report(plan: PrunePlan, dims: Dims) -> dict:
    counts = plan.kept_counts()
    return {
        "per_layer": counts,
        "kv_groups_kept": sum(c["kv_heads"] for c in counts),
        "kv_groups_total": dims.n_layers * dims.n_kv_heads,
        "heads_kept": sum(c["heads"] for c in counts),
        "heads_total": dims.n_layers * dims.n_heads,
        "channels_kept": sum(c["channels"] for c in counts),
        "channels_total": dims.n_layers * dims.d_ff,
        "blocks_removed": list(plan.dropped),
    }


class Timer:
    """Named wall-clock sections, in seconds."""

    def __init__(self) -> None:
        self.sections: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.sections[name] = self.sections.get(name, 0.0) + time.perf_counter() - t0


@dataclass(frozen=True)
class PruneReport:
    """What a pruning run did: built once by `prune`; the CLI adds the evaluation with `with_evaluation`.
    Reads like a dict too (`report["params"]`), and `to_dict()` is what report.json and the manifest hold."""

    architecture: str
    config: dict
    compensation: str
    dense_shape: dict
    params: dict
    layers: dict
    calibration: dict | None
    timings_s: dict
    versions: dict
    offload: dict | None = None  # the layer provider's own numbers (streamed models)
    # filled in by the CLI
    model: str | None = None
    title: str | None = None
    perplexity: dict | None = None
    zeroshot: dict | None = None
    plan: dict | None = None
    extra: dict = dataclasses.field(default_factory=dict)  # e.g. the CLI's calibration source and seed

    def __getitem__(self, key: str):
        if key in self.extra:
            return self.extra[key]
        if key not in self.__dataclass_fields__ or key == "extra":
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default=None):
        try:
            return self[key]
        except KeyError:
            return default

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**out, **self.extra}

    def with_evaluation(self, **fields) -> "PruneReport":
        """A copy with the CLI's fields (model, title, perplexity, zeroshot, plan, timings_s; other keys go to
        `extra`)."""
        known = {k: v for k, v in fields.items() if k in self.__dataclass_fields__ and k != "extra"}
        extra = {**self.extra, **{k: v for k, v in fields.items() if k not in known}}
        return dataclasses.replace(self, **known, extra=extra)

    def to_markdown(self) -> str:
        return render_markdown(self)

    def summary(self) -> str:
        return summary_table(self)


def zeroshot_markdown(columns: dict[str, dict]) -> str:
    """A table of zero-shot accuracy (acc, with acc_norm where the task reports it), one column per model."""
    names = list(columns)
    first = next(iter(columns.values()))
    tasks = [t for t in first if isinstance(first[t], dict)]
    lines = ["| task | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]

    def cell(r: dict) -> str:
        txt = f"{100 * r['acc']:.1f} ± {100 * (r['acc_stderr'] or 0):.1f}"
        if "acc_norm" in r:
            txt += f" (norm {100 * r['acc_norm']:.1f})"
        return txt

    for t in tasks:
        lines.append(f"| {t} (n={columns[names[0]][t]['n']}) | " + " | ".join(cell(columns[n][t]) for n in names) + " |")
    lines.append("| average acc | " + " | ".join(f"{100 * columns[n]['average']:.2f}" for n in names) + " |")
    return "\n".join(lines) + "\n"


def _before_heal(report: PruneReport | dict) -> float | None:
    """prune --heal-tokens: the pruned model's perplexity before it was healed."""
    return (report.get("heal") or {}).get("ppl_before_heal")


def render_markdown(report: PruneReport | dict) -> str:
    """report.md: the parameters, widths, evaluation and per-layer plan of a pruning run."""
    p, layers = report["params"], report["layers"]
    ppl = report.get("perplexity") or {}
    lines = [
        "# flap-llm pruning report", "",
        f"- model: `{report.get('model')}` ({report['architecture']})",
        f"- config: `{json.dumps(report['config'])}`",
        f"- calibration: `{json.dumps(report['calibration'])}`",
        f"- versions: `{json.dumps(report['versions'])}`", "",
        "| | before | after | removed |", "|---|---:|---:|---:|",
        f"| decoder attention+MLP params | {p['decoder_before']:,} | {p['decoder_after']:,} | {p['decoder_removed_fraction']:.2%} |",
        f"| whole-model params | {p['model_before']:,} | {p['model_after']:,} | {p['model_removed_fraction']:.2%} |",
        f"| KV groups | {layers['kv_groups_total']} | {layers['kv_groups_kept']} | |",
        f"| MLP channels | {layers['channels_total']:,} | {layers['channels_kept']:,} | |",
    ]
    if ppl:
        lines.append(f"| perplexity ({ppl['spec']}, {ppl['seqlen']} tokens) | {ppl['ppl_before']:.2f} | {ppl['ppl_after']:.2f} | |")
        if _before_heal(report) is not None:
            lines.append(f"| perplexity pruned, before healing | | {_before_heal(report):.2f} | |")
    gguf = report.get("gguf")
    if gguf:
        lines.append(f"| GGUF `{gguf['file']}` ({gguf['type']}) | | {gguf['bytes'] / 2**20:.1f} MiB | |")
        if gguf.get("llama_perplexity") is not None:
            lines.append(f"| llama.cpp perplexity ({gguf['llama_perplexity_spec']}, {gguf['llama_perplexity_ctx']} "
                         f"tokens, llama-perplexity's convention) | | {gguf['llama_perplexity']:.2f} | |")
    if report.get("zeroshot"):
        lines += ["", "Zero-shot accuracy (%, lm-evaluation-harness):", "",
                  zeroshot_markdown({"dense": report["zeroshot"]["before"], "pruned": report["zeroshot"]["after"]})]
    lines += ["", "| layer | heads | KV heads | channels |", "|---:|---:|---:|---:|"]
    lines += [f"| {i} | {c['heads']} | {c['kv_heads']} | {c['channels']} |" for i, c in enumerate(layers["per_layer"])]
    lines += ["", "Timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in report["timings_s"].items()), ""]
    return "\n".join(lines)


def summary_table(report: PruneReport | dict) -> str:
    """The console summary of a pruning run: dense against pruned."""
    p, layers = report["params"], report["layers"]
    ppl = report.get("perplexity") or {}
    rows = [("decoder params", f"{p['decoder_before']:,}", f"{p['decoder_after']:,} (-{p['decoder_removed_fraction']:.1%})"),
            ("model params", f"{p['model_before']:,}", f"{p['model_after']:,} (-{p['model_removed_fraction']:.1%})"),
            ("KV groups", str(layers["kv_groups_total"]), str(layers["kv_groups_kept"])),
            ("MLP channels", f"{layers['channels_total']:,}", f"{layers['channels_kept']:,}")]
    if ppl:
        rows.append((f"perplexity ({ppl['spec']})", f"{ppl['ppl_before']:.2f}", f"{ppl['ppl_after']:.2f}"))
        if _before_heal(report) is not None:
            rows.append(("  pruned, before healing", "", f"{_before_heal(report):.2f}"))
    if report.get("zeroshot"):
        rows.append(("zero-shot avg acc", f"{100 * report['zeroshot']['before']['average']:.2f}",
                     f"{100 * report['zeroshot']['after']['average']:.2f}"))
    gguf = report.get("gguf")
    if gguf:
        rows.append((f"GGUF {gguf['type']}", "", f"{gguf['bytes'] / 2**20:.1f} MiB"))
        if gguf.get("llama_perplexity") is not None:
            rows.append((f"llama.cpp perplexity ({gguf['llama_perplexity_spec']})", "",
                         f"{gguf['llama_perplexity']:.2f}"))
    rows.append(("time (s)", "", f"{report['timings_s']['total']:.1f} pruning"))
    w = max(len(r[0]) for r in rows)
    out = [f"{'':{w}}  {'dense':>14}  {'pruned':>24}"]
    out += [f"{a:{w}}  {b:>14}  {c:>24}" for a, b, c in rows]
    return "\n".join(out)
