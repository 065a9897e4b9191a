"""Attention backends behind one function-shaped interface, chosen once per model.

Every backend offers the same two calls (legend: N packed tokens, B rows, S cache slots,
H query heads, G key/value heads, D head dim):

- `prefill(q [N, H, D], k [N, G, D], v [N, G, D], varlen, scale) -> [N, H, D]`: causal attention
  inside each packed row (`varlen.cu_seqlens`), never across rows.
- `decode(q [B, H, D], k_cache [B, S, G, D], v_cache [B, S, G, D], seqlens [B], scale) -> [B, H, D]`:
  one query per row over the first `seqlens[b]` cache slots of its row.
- `decode_step(q [B, H, D], k_new [B, G, D], v_new [B, G, D], cache, layer, scale) -> [B, H, D]`: what a decode
  step calls: writes the new token into the `PmodCache` layer and attends (SDPA / eager: `cache.append` then
  `decode`; flash-attn: `flash_attn_with_kvcache(..., k=, v=)` inserts and attends in one kernel).
"""
from __future__ import annotations

from pmod.attention.registry import BACKENDS, AttentionBackend, available_backends, resolve_backend

__all__ = ["AttentionBackend", "BACKENDS", "available_backends", "resolve_backend"]
