"""Models and checkpoints: the architecture table, the plan and how it is applied, loading (folders, GGUF files,
the hub), the pruned-model classes (modeling_flap.py, copied into every checkpoint) and the checkpoint itself."""
