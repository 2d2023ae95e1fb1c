"""Exporters of pruned models to the formats engines load: GGUF for llama.cpp (and what is built on it)."""

from .gguf_file import GGUF_DTYPES, QUANT_TYPES, export_gguf, gguf_alignment, gguf_type, save_gguf

__all__ = ["GGUF_DTYPES", "QUANT_TYPES", "export_gguf", "gguf_alignment", "gguf_type", "save_gguf"]
