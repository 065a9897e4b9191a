"""FlashAttention-2 (the optional `flash-attn` package, CUDA only): varlen prefill and KV-cache decode."""
from __future__ import annotations

import torch
from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache

from pmod.packing import Varlen

__all__ = ["prefill", "decode"]


def prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, varlen: Varlen, scale: float) -> torch.Tensor:
    return flash_attn_varlen_func(
        q, k, v,
        cu_seqlens_q=varlen.cu_seqlens, cu_seqlens_k=varlen.cu_seqlens,
        max_seqlen_q=varlen.max_seqlen, max_seqlen_k=varlen.max_seqlen,
        softmax_scale=scale, causal=True,
    )


def decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seqlens: torch.Tensor, scale: float,
           uniform: bool = False) -> torch.Tensor:
    # q [B, H, D] -> [B, 1, H, D]; k/v_cache [B, S, G, D], the new token already written.
    o = flash_attn_with_kvcache(q[:, None], k_cache, v_cache, cache_seqlens=seqlens.to(torch.int32),
                                softmax_scale=scale, causal=True)
    return o[:, 0]
