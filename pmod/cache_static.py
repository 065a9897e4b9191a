"""Static tensors for a cache that a CUDA graph replays, kept by a graph pool rather than by one cache.

A graph reads and writes fixed addresses. To replay one graph for many generate calls, the tensors it captured
(every layer's k and v at full capacity, per-layer lengths, positions) outlive each call's cache: each new
cache copies its prefill into them and uses them (`PmodCache.make_static(steps, into=...)`).
Legend: B rows, S slots, G kv heads, D head dim.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["StaticKV", "load_static"]


@dataclass
class StaticKV:
    """Tensors a CUDA graph replays, owned outside one cache (`pmod.cudagraph`): per-layer k, v at full capacity,
    seqlens [B] per layer, positions [B], rows [B] = arange(B). `PmodCache.make_static(into=...)` loads into them."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    seqlens: list[torch.Tensor]
    positions: torch.Tensor
    rows: torch.Tensor


def load_static(cache, steps: int, into: StaticKV) -> None:
    """`PmodCache.make_static(steps, into)`: copy the cache's filled slots, seqlens and positions into `into`,
    zero the other slots, and make the cache use those tensors (static from then on)."""
    c = cache
    for i in range(c.num_layers):
        k, n, mine = into.k[i], max(c.lengths[i]), c.k[i].shape
        if k.dtype != c.k[i].dtype or k.shape[0] != c.batch_size or k.shape[c.slot_dim] < n + steps or \
                k.shape[3 - c.slot_dim] != mine[3 - c.slot_dim] or k.shape[3] != mine[3]:
            raise ValueError(f"PmodCache.make_static: layer {i}'s static tensor {tuple(k.shape)} {k.dtype} cannot hold "
                             f"{c.batch_size} row(s) of {n} + {steps} slots like {tuple(mine)} {c.k[i].dtype}")
        for dst, src in ((into.k[i], c.k[i]), (into.v[i], c.v[i])):
            c.slots(dst)[:, :n] = c.slots(src)[:, :n]
            c.slots(dst)[:, n:].zero_()  # masked slots must be finite: 0 * NaN would leak through attention
        into.seqlens[i].copy_(c.seqlens[i])
    into.positions.copy_(c.positions)
    c.k, c.v, c.seqlens = list(into.k), list(into.v), list(into.seqlens)
    c.positions, c._rows, c.static = into.positions, into.rows, True  # every filled slot copied: snapshots stay valid
