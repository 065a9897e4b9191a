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


KEPT_DIM = 0.18  # brightness of a dropped patch in the map


def save_routing_map(image, grids: dict[int, np.ndarray], path: str | Path, title: str = "",
                     objects: np.ndarray | None = None, boxes: Sequence[Sequence[int]] = (),
                     caption: Sequence[str] = ()) -> Path:
    """One panel per MoD layer: the image with dropped patches dimmed, kept ones as they are; a legend below.

    objects: [grid, grid] bool, outlined as one contour (legacy); boxes: object boxes (x0, y0, x1, y1) in pixels,
    each outlined on its patches (what the router would have to keep). caption: lines under the title (the
    question, the models' answers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch, Rectangle

    img = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    layers = sorted(grids)
    cols = min(len(layers) + 1, 6)
    rows = int(np.ceil((len(layers) + 1) / cols))
    head = 0.35 * (bool(title) + len(caption))  # inches of text above the panels
    fig, axes = plt.subplots(rows, cols, figsize=(2.3 * cols, 2.3 * rows + head + 0.5), squeeze=False)
    axes = axes.flatten()
    outline = "#ffd400"

    def outline_objects(ax, cell: int) -> None:
        for x0, y0, x1, y1 in boxes:  # snapped to the patches the box overlaps
            px0, py0 = x0 // cell * cell, y0 // cell * cell
            px1, py1 = -(-(x1 + 1) // cell) * cell, -(-(y1 + 1) // cell) * cell
            ax.add_patch(Rectangle((px0 - 0.5, py0 - 0.5), px1 - px0, py1 - py0, fill=False, ec=outline, lw=1.2))

    cell = img.shape[0] // next(iter(grids.values())).shape[0] if grids else 1
    axes[0].imshow(img)
    outline_objects(axes[0], cell)
    axes[0].set_title("input", fontsize=9)
    for ax, layer in zip(axes[1:], layers):
        g = grids[layer]
        up = np.kron(g, np.ones((img.shape[0] // g.shape[0], img.shape[1] // g.shape[1]), dtype=bool))
        ax.imshow(img * np.where(up[..., None], 1.0, KEPT_DIM))
        if objects is not None and not len(boxes):
            ob = np.kron(objects, np.ones((img.shape[0] // g.shape[0], img.shape[1] // g.shape[1])))
            ax.contour(ob, levels=[0.5], colors=outline, linewidths=0.8)
        outline_objects(ax, cell)
        ax.set_title(f"MoD layer {layer}: {int(g.sum())}/{g.size} kept", fontsize=9)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[len(layers) + 1 :]:
        ax.axis("off")
    text = "\n".join([t for t in [title] if t] + list(caption))
    if text:
        fig.suptitle(text, fontsize=9.5)
    handles = [Patch(fc="0.75", ec="0.3", label="kept patch: the layer processes its token"),
               Patch(fc=str(0.75 * KEPT_DIM), ec="0.3", label="dropped patch: its token skips the layer"),
               Line2D([], [], color=outline, lw=1.5, label="object (the patches its box covers)")]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8.5, frameon=False)
    fig.tight_layout(rect=(0, 0.45 / fig.get_figheight(), 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
