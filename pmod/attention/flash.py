"""FlashAttention-2 (the optional `flash-attn` package, CUDA only): varlen prefill and KV-cache decode.

`flash_attn` is imported on first use, so this module loads (and its call shapes are testable) without it.
Decode hands the new token's k, v to `flash_attn_with_kvcache(..., k=, v=)`, which writes them at each row's
`cache_seqlens` slot and attends over the result in one kernel: the backend owns the cache write.
Legend: N packed tokens, B rows, S cache slots, H/G query/kv heads, D head dim.
"""
from __future__ import annotations

import importlib

import torch

from pmod.packing import Varlen

__all__ = ["prefill", "decode", "decode_step"]


def _fa():
    return importlib.import_module("flash_attn")


def prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, varlen: Varlen, scale: float) -> torch.Tensor:
    return _fa().flash_attn_varlen_func(
        q, k, v,
        cu_seqlens_q=varlen.cu_seqlens, cu_seqlens_k=varlen.cu_seqlens,
        max_seqlen_q=varlen.max_seqlen, max_seqlen_k=varlen.max_seqlen,
        softmax_scale=scale, causal=True,
    )


def decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seqlens: torch.Tensor, scale: float,
           uniform: bool = False) -> torch.Tensor:
    # q [B, H, D] -> [B, 1, H, D]; k/v_cache [B, S, G, D], the new token already written.
    o = _fa().flash_attn_with_kvcache(q[:, None], k_cache, v_cache, cache_seqlens=seqlens.to(torch.int32),
                                      softmax_scale=scale, causal=True)
    return o[:, 0]


def decode_step(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, cache, layer: int, scale: float) -> torch.Tensor:
    """q, k_new, v_new [B, H|G, D] of one new token per row -> [B, H, D]; the kernel inserts k_new, v_new."""
    fa = _fa()

    def attend(k_store, v_store, seqlens):  # [B, S_cap, G, D] with room for the slot; seqlens [B] before it
        o = fa.flash_attn_with_kvcache(q[:, None], k_store, v_store, k=k_new[:, None], v=v_new[:, None],
                                       cache_seqlens=seqlens.to(torch.int32), softmax_scale=scale, causal=True)
        return o[:, 0]

    return cache.append_in_kernel(layer, attend)
