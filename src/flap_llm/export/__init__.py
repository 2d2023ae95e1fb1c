"""Exporters of pruned models to the formats engines load: GGUF for llama.cpp (and what is built on it)."""

from .gguf_file import GGUF_DTYPES, save_gguf

__all__ = ["GGUF_DTYPES", "save_gguf"]
