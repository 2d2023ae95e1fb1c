"""Format "vllm": the flap checkpoint, which vLLM serves through flap-llm's plugin (flap_llm/serving), with the
served families checked before any work. The folder is the same as format "flap"'s, so it also loads in
transformers with trust_remote_code=True."""

from __future__ import annotations

from torch import nn

from ..errors import FlapError
from ..model.arch import architecture_of
from ..serving import vllm_refusal
from .flap_format import FlapFormat


class VllmFormat(FlapFormat):
    name = "vllm"
    summary = "the flap checkpoint, checked to serve in vLLM (pip install flap-llm into vLLM's environment)"

    def check(self, model: nn.Module) -> None:
        refusal = vllm_refusal(architecture_of(model))
        if refusal:
            raise FlapError(refusal + "; or save it with --export flap")
