"""PyTorch fused attention (F.scaled_dot_product_attention), the default off-GPU and without flash-attn.

Prefill runs each packed row as its own causal call: no block-diagonal [N, N] mask is ever built,
and each call can take SDPA's flash / memory-efficient kernels (`is_causal=True`, no mask).

On CUDA the model runs these calls inside `kernel_scope`, which leaves cuDNN attention out: PyTorch
prefers it on Hopper, and it builds an execution plan for every new sequence length (57 ms a call for
a new decode length, 75 ms for a new prefill length, vs 0.5 ms for the flash / memory-efficient
kernels; H200, torch 2.11, BENCHMARKS.md). MoD layers meet a new length per layer and per decode step.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from pmod.packing import Varlen

__all__ = ["prefill", "decode", "kernel_scope", "CUDA_KERNELS"]

CUDA_KERNELS = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)


def kernel_scope(device: torch.device | str) -> contextlib.AbstractContextManager:
    """The SDPA kernels a forward on `device` may use: on CUDA, all but cuDNN (see above); elsewhere PyTorch's choice."""
    if torch.device(device).type == "cuda":
        return sdpa_kernel(list(CUDA_KERNELS))
    return contextlib.nullcontext()


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(0, 1).unsqueeze(0)  # [n, h, D] -> [1, h, n, D]


def prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, varlen: Varlen, scale: float) -> torch.Tensor:
    gqa = q.shape[1] != k.shape[1]
    if len(varlen.lens) == 1:
        o = F.scaled_dot_product_attention(_heads_first(q), _heads_first(k), _heads_first(v), is_causal=True,
                                           scale=scale, enable_gqa=gqa)
        return o[0].transpose(0, 1)
    out = torch.empty_like(q)
    start = 0
    for n in varlen.lens:  # host lengths: no device sync
        s = slice(start, start + n)
        o = F.scaled_dot_product_attention(_heads_first(q[s]), _heads_first(k[s]), _heads_first(v[s]), is_causal=True,
                                           scale=scale, enable_gqa=gqa)
        out[s] = o[0].transpose(0, 1)
        start += n
    return out


def decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seqlens: torch.Tensor, scale: float,
           uniform: bool = False) -> torch.Tensor:
    """q [B, H, D]; k/v_cache [B, G, S, D] (heads first); rows of equal length need no mask."""
    mask = None
    if not uniform:
        S = k_cache.shape[2]
        mask = (torch.arange(S, device=q.device)[None, :] < seqlens[:, None])[:, None, None, :]  # [B, 1, 1, S]
    o = F.scaled_dot_product_attention(q[:, :, None], k_cache, v_cache, attn_mask=mask, scale=scale,
                                       enable_gqa=q.shape[1] != k_cache.shape[1])  # [B, H, 1, D]
    return o[:, :, 0]
