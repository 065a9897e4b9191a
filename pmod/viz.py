"""Pictures people would rather look at than read: routing maps of kept patches per MoD layer."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from pmod.modeling.mod import RoutingRecord

__all__ = ["kept_patch_grids", "save_routing_map"]


def kept_patch_grids(routing: Sequence[RoutingRecord], vision_positions: torch.Tensor, grid: int, row: int = 0) -> dict[int, np.ndarray]:
    """{layer: [grid, grid] bool} of the patches a layer kept, for one image of side `grid` patches.

    vision_positions: [grid*grid] merged-sequence positions of that image's tokens, in patch order.
    """
    pos = vision_positions.tolist()
    index = {p: i for i, p in enumerate(pos)}
    out = {}
    for rec in routing:
        kept = [index[p] for p in rec.kept[row].tolist() if p in index]
        m = np.zeros(grid * grid, dtype=bool)
        m[kept] = True
        out[rec.layer] = m.reshape(grid, grid)
    return out


def save_routing_map(image, grids: dict[int, np.ndarray], path: str | Path, title: str = "", objects: np.ndarray | None = None) -> Path:
    """One panel per MoD layer: the image with dropped patches dimmed. `objects` [grid, grid] outlines object patches."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    layers = sorted(grids)
    cols = min(len(layers) + 1, 6)
    rows = int(np.ceil((len(layers) + 1) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.6 * rows), squeeze=False)
    axes = axes.flatten()
    axes[0].imshow(img)
    axes[0].set_title("input", fontsize=9)
    for ax, layer in zip(axes[1:], layers):
        g = grids[layer]
        up = np.kron(g, np.ones((img.shape[0] // g.shape[0], img.shape[1] // g.shape[1]), dtype=bool))
        shown = img * np.where(up[..., None], 1.0, 0.18)
        ax.imshow(shown)
        if objects is not None:
            ob = np.kron(objects, np.ones_like(up[: img.shape[0] // g.shape[0], : img.shape[1] // g.shape[1]], dtype=float))
            ax.contour(ob, levels=[0.5], colors="white", linewidths=0.6)
        ax.set_title(f"layer {layer}: {int(g.sum())}/{g.size} kept", fontsize=9)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[len(layers) + 1 :]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
