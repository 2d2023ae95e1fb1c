"""Format "flap": safetensors weights, config.json (the base config plus per-layer shapes in `flap_layers` and an
`auto_map` to modeling_flap.py, copied beside the weights so that `AutoModelForCausalLM.from_pretrained(path,
trust_remote_code=True)` works without flap_llm). Holds any plan of any method and family."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from torch import nn

from ..model import modeling_flap
from ..model.arch import ARCHITECTURES, architecture_of, dims_of, spec_of
from ..errors import FlapError
from .base import CheckpointFormat


class FlapFormat(CheckpointFormat):
    name = "flap"
    summary = "any plan (our modeling file, trust_remote_code=True)"
    streams = True

    def files(self, folder: Path, model: nn.Module) -> None:
        _write_flap_config(folder / "config.json", model, spec_of(model))
        shutil.copyfile(modeling_flap.__file__, folder / "modeling_flap.py")

    def loads(self, folder: Path, dtype=None):
        from transformers import AutoConfig
        config = AutoConfig.from_pretrained(folder)
        base = getattr(config, "flap_base_architecture", None)
        if base not in ARCHITECTURES or not getattr(config, "flap_layers", None):
            raise FlapError(f"{folder}/config.json lacks flap_base_architecture/flap_layers; re-save the checkpoint")
        cls = modeling_flap.flap_class(base)
        return cls.from_pretrained(folder, config=config, dtype=dtype, output_loading_info=True)


def _write_flap_config(config_path: Path, model: nn.Module, spec) -> None:
    """Point config.json at the pruned class of modeling_flap.py, with the layout it rebuilds the layers from."""
    cfg = json.loads(config_path.read_text())
    arch = architecture_of(model)
    if not cfg.get("flap_layers"):
        raise FlapError("this model has not been pruned by flap_llm.prune; nothing to save in format 'flap'")
    cls = modeling_flap.flap_class(arch).__name__
    cfg["architectures"] = [cls]
    cfg["flap_base_architecture"] = arch
    cfg["flap_modules"] = {**spec.modules(), "head_dim": dims_of(model).head_dim}
    cfg["auto_map"] = {"AutoModelForCausalLM": f"modeling_flap.{cls}"}
    config_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
