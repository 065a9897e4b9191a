"""Triton row gather x[idx] into the packed layout of the kept tokens, and its backward (a scatter).

Because idx is unique (each kept token once), the backward is a plain store into a zeroed [N, C] gradient: no atomics,
deterministic, unlike `index_select`'s `index_add_` backward. Legend: N packed tokens, C hidden size, Nk kept rows.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from .triton_common import block_c

__all__ = ["GatherRows", "copy_rows"]

BLOCK_R = 16


@triton.jit
def _copy_rows_kernel(
    src_ptr, dst_ptr, idx_ptr, n_rows, C, stride_src, stride_dst,
    SCATTER: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # [R], position in idx
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)  # [BC]
    rmask = offs < n_rows
    mask = rmask[:, None] & (cols < C)[None, :]
    rows = tl.load(idx_ptr + offs, mask=rmask, other=0).to(tl.int64)  # [R]
    if SCATTER:
        src_rows, dst_rows = offs.to(tl.int64), rows
    else:
        src_rows, dst_rows = rows, offs.to(tl.int64)
    v = tl.load(src_ptr + src_rows[:, None] * stride_src + cols[None, :], mask=mask, other=0.0)
    tl.store(dst_ptr + dst_rows[:, None] * stride_dst + cols[None, :], v, mask=mask)


def copy_rows(src: torch.Tensor, dst: torch.Tensor, idx: torch.Tensor, scatter: bool) -> torch.Tensor:
    """dst[j] = src[idx[j]] (gather) or dst[idx[j]] = src[j] (scatter), in place; src, dst: [*, C], same dtype,
    unit column stride; idx: [Nk] long."""
    n_rows, C = idx.numel(), src.shape[1]
    if n_rows and C:
        bc = block_c(C)
        grid = (triton.cdiv(n_rows, BLOCK_R), triton.cdiv(C, bc))
        _copy_rows_kernel[grid](
            src, dst, idx, n_rows, C, src.stride(0), dst.stride(0),
            SCATTER=scatter, BLOCK_R=BLOCK_R, BLOCK_C=bc,
        )
    return dst


class GatherRows(torch.autograd.Function):
    """Autograd wrapper of the Triton gather; arguments as `pmod_kernels.reference.gather_rows`."""

    @staticmethod
    def forward(ctx, x, idx):
        x, idx = x.contiguous(), idx.contiguous()
        out = x.new_empty(idx.numel(), x.shape[1])  # [Nk, C]
        ctx.save_for_backward(idx)
        ctx.n = x.shape[0]
        return copy_rows(x, out, idx, scatter=False)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        (idx,) = ctx.saved_tensors
        g = g.contiguous()
        dx = g.new_zeros(ctx.n, g.shape[1])  # [N, C]
        return copy_rows(g, dx, idx, scatter=True), None
