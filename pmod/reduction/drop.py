"""Dropping vision tokens from the packed sequence for good: the kept tokens as a new, smaller `Layout`.

Every later layer then runs (and caches) only the kept tokens, dense and MoD layers alike (a MoD layer routes among
the vision tokens still there). Kept tokens keep their position ids and their merged positions (`out_index`), so
RoPE sees the gaps, `Layout.pad` and routing records stay in the input's index space, and decoding continues the
full sequence. Sizes come from the host (k per row), so nothing here syncs with the device.
Legend: N packed tokens (N' after the drop), B rows, V vision slots per row, K = max kept per row.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pmod.packing import Layout, Varlen, _varlen_arrays, upload

__all__ = ["DropState", "drop_vision"]


def drop_vision(layout: Layout, scores: torch.Tensor, k: list[int]) -> tuple[Layout, torch.Tensor]:
    """Keep each row's text and its k[b] best-scored vision tokens. scores [B, V] (-inf on padded slots).
    Returns (the new layout, idx [N'] long: packed index in `layout` of each kept token, ascending)."""
    B, V = layout.vision_slots.shape
    N = layout.num_tokens
    if any(not 0 <= kb <= n for kb, n in zip(k, layout.n_vision)):
        raise ValueError(f"drop_vision: keep counts {k} must lie in 0..n_vision {layout.n_vision}")
    K = max(k, default=0)
    lens = [n - v + kb for n, v, kb in zip(layout.varlen.lens, layout.n_vision, k)]
    n_new = sum(lens)
    offsets = np.concatenate([[0], np.cumsum(layout.n_vision)[:-1]]).astype(np.int64)  # first vision rank of each row
    t = upload({"k": np.asarray(k, np.int64), "flat": np.concatenate([b * K + np.arange(kb) for b, kb in enumerate(k)] or [np.zeros(0, np.int64)]),
                "offsets": offsets, **_varlen_arrays(lens, "v_")}, layout.position_ids.device)
    dev = layout.position_ids.device
    valid = torch.arange(K, device=dev)[None, :] < t["k"][:, None]  # [B, K]
    cols = scores.topk(K, dim=1).indices if K else scores.new_zeros((B, 0), dtype=torch.long)  # [B, K]
    cols = torch.where(valid, cols, V).sort(dim=1).values  # chosen vision slots ascending, V on unused entries
    old = layout.vision_slots.gather(1, cols.clamp(max=max(V - 1, 0)))  # [B, K] packed index of each kept vision token
    old = torch.where(valid, old, N)  # N: the sink slot of text_keep
    keep = layout.text_keep().clone()  # [N + 1]
    keep[old.flatten()] = True
    keep = keep[:N]
    new_index = keep.cumsum(0) - 1  # [N] packed index after the drop (meaningful where keep)
    idx = torch.zeros(n_new + 1, dtype=torch.long, device=dev)
    idx = idx.scatter(0, torch.where(keep, new_index, n_new), torch.arange(N, device=dev))[:n_new]  # [N'] ascending
    slots = torch.where(valid, new_index[old.clamp(max=N - 1)], n_new)  # [B, K]
    vision_dest = slots.flatten().index_select(0, t["flat"])  # [Nv'] in row-major (image-feature) order
    rank = (t["offsets"][:, None] + cols).flatten().index_select(0, t["flat"])  # [Nv'] rank in the old vision order
    inject = None if layout.inject is None else {i: f.index_select(0, rank) for i, f in layout.inject.items()}
    new = Layout(
        batch_size=B, merged_len=layout.merged_len, n_vision=list(k), varlen=Varlen._from(lens, t, "v_"),
        position_ids=layout.position_ids.index_select(0, idx), vision_mask=layout.vision_mask.index_select(0, idx),
        text_src=layout.text_src, text_dest=new_index.index_select(0, layout.text_dest), vision_dest=vision_dest,
        vision_slots=slots, vision_valid=valid, vision_flat=t["flat"], out_index=layout.out_index.index_select(0, idx),
        left_padded=layout.left_padded, _plans={},
        rope_positions=None if layout.rope_positions is None else layout.rope_positions.index_select(1, idx),
        next_positions=layout.next_positions, inject=inject,
    )
    return new, idx


@dataclass
class DropState:
    """The full packed sequence while tokens are dropped: `full` [N0, C] holds each dropped token's state as it
    left; `where` [N'] is the original packed index of each token still running. `restore` puts them back."""

    full: torch.Tensor | None = None
    where: torch.Tensor | None = None

    def drop(self, x: torch.Tensor, idx: torch.Tensor) -> None:
        """Record x [N, C] (the running tokens at a drop) before keeping x[idx]."""
        if self.full is None:
            self.full, self.where = x, idx
        else:
            self.full = self.full.index_copy(0, self.where, x)
            self.where = self.where.index_select(0, idx)

    def restore(self, x: torch.Tensor) -> torch.Tensor:
        """The running tokens x [N', C] written back into the full sequence: [N0, C] in the original packing."""
        return x if self.full is None else self.full.index_copy(0, self.where, x)
