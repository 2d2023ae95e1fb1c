"""Healing: distillation of the dense model into the pruned one (full or LoRA, replicated or sharded)."""
