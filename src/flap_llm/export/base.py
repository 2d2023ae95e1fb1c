"""What an output format is to the rest of flap-llm. Two kinds:

- a checkpoint format (`CheckpointFormat`): a folder of safetensors weights and a config that some loader reads
  (our remote code, stock transformers, an engine); `save_pruned`/`--export NAME` write it, and its checks run
  before any work;
- a file format (the GGUF exporter, gguf_file.py): one file for an engine, with its own weight types.

A new format is one module under export/ and one line in export/registry.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from torch import nn


class CheckpointFormat:
    """A checkpoint format. `weights` gives the module whose safetensors and config are saved; `files` adds
    what the format needs beside them (a config rewrite, a modeling file); `check` refuses a model the format
    cannot hold, before anything is written."""

    name: ClassVar[str]
    summary: ClassVar[str]  # for --export's help
    streams: ClassVar[bool] = False  # whether a model streamed layer by layer (--offload) can be written in it

    def check(self, model: nn.Module) -> None:
        """Raise FlapError with what to do when the format cannot hold `model`."""

    def weights(self, model: nn.Module) -> nn.Module:
        return model

    def files(self, folder: Path, model: nn.Module) -> None:
        """Files beside the weights and config.json (written into the temporary checkpoint folder)."""

    def loads(self, folder: Path, dtype=None):
        """The model the folder holds, and transformers' loading info."""
        raise NotImplementedError
