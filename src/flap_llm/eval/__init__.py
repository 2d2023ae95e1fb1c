"""Evaluation: perplexity on held-out windows, and zero-shot accuracy through lm-evaluation-harness (offline)."""
