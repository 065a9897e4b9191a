"""Attention and KV-cache objects for the compiled decoder (`pmod.modeling.compiled`), written for tracing.

`Attention.forward` calls `ctx.backend.prefill / decode` and `ctx.cache.store / append`; these objects offer the
same calls with every size read from a tensor shape, so `torch.compile(fullgraph=True)` traces them and marks the
sizes dynamic. Numerically they are SDPA's attention: one causal call at batch 1 (as the sdpa backend), a padded
[B, L] batch under a causal + length mask at batch > 1 (one call instead of one per row: the host loop over
row lengths would bake every length into the graph), and over a cache's full capacity under a length mask in decode.
Legend: N packed tokens, B rows, L longest row, H/G query/kv heads, D head dim, S cache slots.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from pmod.packing import Layout, Varlen

__all__ = ["CollectKV", "PackedRows", "SlotWriter", "TracedAttention", "packed_rows"]


class PackedRows(NamedTuple):
    """A `Varlen` as tensors: row [N], slot [N] of each packed token, seqlens [B]; span [L] = arange(longest row),
    None at batch 1 (then the whole packed sequence is one causal row)."""

    row: torch.Tensor
    slot: torch.Tensor
    seqlens: torch.Tensor
    span: torch.Tensor | None


def packed_rows(layout: Layout, varlen: Varlen) -> PackedRows:
    """The traced form of `varlen` (one of the layout's), its varying sizes marked dynamic."""
    span = None
    if len(varlen.lens) > 1:
        span = torch.arange(varlen.max_seqlen, device=varlen.row.device)
        torch._dynamo.maybe_mark_dynamic(span, 0)
    for t in (varlen.row, varlen.slot, varlen.seqlens):
        torch._dynamo.maybe_mark_dynamic(t, 0)
    return PackedRows(varlen.row, varlen.slot, varlen.seqlens, span)


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(0, 1).unsqueeze(0)  # [n, h, D] -> [1, h, n, D]


class TracedAttention:
    """The `AttentionBackend` calls over `PackedRows` (prefill) and a full-capacity cache (decode)."""

    name = "compiled"

    def __init__(self, heads_first: bool = True):
        self.heads_first = heads_first  # decode: the cache's storage layout

    def prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: PackedRows, scale: float) -> torch.Tensor:
        """q [N, H, D], k/v [N, G, D] -> [N, H, D], causal within each row."""
        gqa = q.shape[1] != k.shape[1]
        if rows.span is None:
            o = F.scaled_dot_product_attention(_heads_first(q), _heads_first(k), _heads_first(v), is_causal=True,
                                               scale=scale, enable_gqa=gqa)
            return o[0].transpose(0, 1)
        B, L = rows.seqlens.shape[0], rows.span.shape[0]
        dest = rows.row * L + rows.slot  # [N] flat index into [B, L]

        def padded(t):  # [N, h, D] -> [B, h, L, D], zeros past each row's end
            return t.new_zeros(B * L, *t.shape[1:]).index_copy(0, dest, t).view(B, L, *t.shape[1:]).transpose(1, 2)

        s = rows.span
        mask = (s[None, :] <= s[:, None]) & (s[None, None, :] < rows.seqlens[:, None, None])  # [B, L, L]
        o = F.scaled_dot_product_attention(padded(q), padded(k), padded(v), attn_mask=mask[:, None], scale=scale,
                                           enable_gqa=gqa)  # [B, H, L, D]; a padded query still sees key 0
        return o.transpose(1, 2).reshape(B * L, *q.shape[1:]).index_select(0, dest)

    def decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seqlens: torch.Tensor, scale: float,
               uniform: bool = False) -> torch.Tensor:
        """q [B, H, D]; k/v_cache the full capacity in storage layout; seqlens [B] valid slots after the write."""
        if not self.heads_first:  # [B, S, G, D] -> [B, G, S, D]
            k_cache, v_cache = k_cache.transpose(1, 2), v_cache.transpose(1, 2)
        S = k_cache.shape[2]
        mask = (torch.arange(S, device=q.device)[None, :] < seqlens[:, None])[:, None, None, :]  # [B, 1, 1, S]
        o = F.scaled_dot_product_attention(q[:, :, None], k_cache, v_cache, attn_mask=mask, scale=scale,
                                           enable_gqa=q.shape[1] != k_cache.shape[1])  # [B, H, 1, D]
        return o[:, :, 0]

    def decode_step(self, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, cache, layer: int, scale: float):
        """The `AttentionBackend.decode_step` entry: write through the traced cache, then attend."""
        k_cache, v_cache, seqlens, uniform = cache.append(layer, k_new, v_new)
        return self.decode(q, k_cache, v_cache, seqlens, scale, uniform)


class CollectKV:
    """Prefill: keeps each layer's (k, v) [N_l, G, D]; the host stores them into the `PmodCache` after the graph."""

    def __init__(self):
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor, rows) -> None:
        self.kv[layer] = (k, v)


class SlotWriter:
    """Decode: `append` writes k, v [B, G, D] in place at each row's next slot of a layer's full-capacity cache.

    seqlens holds one [B] tensor per group of layers that share lengths; `new` their lengths after this step."""

    def __init__(self, ks, vs, seqlens, group: tuple[int, ...], heads_first: bool):
        self.ks, self.vs, self.seqlens, self.group, self.heads_first = ks, vs, seqlens, group, heads_first
        self.new = [s + 1 for s in seqlens]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        kc, vc = self.ks[layer], self.vs[layer]
        at = self.seqlens[self.group[layer]]  # [B] slot of the new token
        rows = torch.arange(k.shape[0], device=k.device)
        for store, new in ((kc, k), (vc, v)):
            (store.transpose(1, 2) if self.heads_first else store)[rows, at] = new  # [B, S, G, D] view
        return kc, vc, self.new[self.group[layer]], False
