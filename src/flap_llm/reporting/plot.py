"""A PNG of what each layer keeps: attention heads and MLP channels, as fractions of the dense layer."""

from __future__ import annotations

from pathlib import Path


def plot_plan(kept: list[dict], n_heads: int, d_ff: int, path: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(range(len(kept)))
    heads = [k["heads"] / n_heads for k in kept]
    channels = [k["channels"] / d_ff for k in kept]
    fig, ax = plt.subplots(figsize=(max(6, len(kept) * 0.3), 3.5), dpi=120)
    width = 0.4
    ax.bar([i - width / 2 for i in layers], heads, width, label=f"attention heads kept (of {n_heads})")
    ax.bar([i + width / 2 for i in layers], channels, width, label=f"MLP channels kept (of {d_ff})")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("fraction kept")
    ax.set_ylim(0, 1.05)
    ax.set_xticks(layers[:: max(1, len(layers) // 16)])
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
