"""Launch helpers shared by the Triton kernels: block sizes and the accumulation dtype."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["acc_dtype", "block_c"]


def block_c(C: int, cap: int = 256) -> int:
    """Columns per program: the next power of two of C, at most `cap`."""
    return min(triton.next_power_of_2(max(C, 1)), cap)


def acc_dtype(dtype: torch.dtype) -> tuple[tl.dtype, torch.dtype]:
    """Math dtype for inputs of `dtype` (Triton and torch spelling): fp64 stays fp64 (gradcheck), the rest use fp32."""
    return (tl.float64, torch.float64) if dtype == torch.float64 else (tl.float32, torch.float32)
