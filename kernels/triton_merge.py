"""Triton STRing merge of a MoD layer (residual add, weight multiply, scatter) in one pass, and its backward.

Forward, per token n with j = pos[n] (its row in the kept layout, or -1):
  out[n] = h_mid[j] + w[n] * m[j]   if kept   (x[n] is not read)
  out[n] = w[n] * x[n]              otherwise
rounded where PyTorch's eager ops round, so each output element equals the reference's (on CUDA; Triton's
interpreter casts fp32 to bf16 by truncation, so there bf16 differs by an ulp). PyTorch needs four
[N, C]-sized passes (multiply, multiply-add on the kept rows, copy, index_copy); this is one read and one write.
The backward is one pass too: dx, dw, dh_mid and dm from one read of the output gradient.
Legend: N packed tokens, C hidden size, Nk kept rows.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from .triton_common import acc_dtype, block_c

__all__ = ["StringMerge", "kept_positions"]

BLOCK_R = 16


@triton.jit
def _merge_fwd_kernel(
    x_ptr, w_ptr, pos_ptr, h_ptr, m_ptr, out_ptr,
    N, C, stride_x, stride_h, stride_m, stride_out,
    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # [R]
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)  # [BC]
    rmask = rows < N
    cmask = (cols < C)[None, :]
    j = tl.load(pos_ptr + rows, mask=rmask, other=-1).to(tl.int64)  # [R]
    kept = j >= 0
    j = tl.where(kept, j, 0)
    w = tl.load(w_ptr + rows, mask=rmask, other=0.0).to(ACC)[:, None]  # [R, 1]
    rows = rows.to(tl.int64)
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=(rmask & ~kept)[:, None] & cmask, other=0.0)
    h = tl.load(h_ptr + j[:, None] * stride_h + cols[None, :], mask=kept[:, None] & cmask, other=0.0)
    m = tl.load(m_ptr + j[:, None] * stride_m + cols[None, :], mask=kept[:, None] & cmask, other=0.0)
    dt = out_ptr.dtype.element_ty
    wm = (w * m.to(ACC)).to(dt).to(ACC)  # rounded as the eager `w * m` is
    out = tl.where(kept[:, None], h.to(ACC) + wm, w * x.to(ACC))
    tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], out.to(dt), mask=rmask[:, None] & cmask)


@triton.jit
def _merge_bwd_kernel(
    g_ptr, x_ptr, w_ptr, pos_ptr, m_ptr, dx_ptr, dw_ptr, dh_ptr, dm_ptr,
    N, C, stride_g, stride_x, stride_m, stride_dx, stride_dh, stride_dm,
    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # [R]
    rmask = rows < N
    j = tl.load(pos_ptr + rows, mask=rmask, other=-1).to(tl.int64)
    kept = j >= 0
    skip = rmask & ~kept
    j = tl.where(kept, j, 0)
    w = tl.load(w_ptr + rows, mask=rmask, other=0.0).to(ACC)[:, None]  # [R, 1]
    rows = rows.to(tl.int64)
    dw = tl.zeros([BLOCK_R], dtype=ACC)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        cmask = (cols < C)[None, :]
        g = tl.load(g_ptr + rows[:, None] * stride_g + cols[None, :], mask=rmask[:, None] & cmask, other=0.0)
        g = g.to(ACC)
        x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=skip[:, None] & cmask, other=0.0)
        m = tl.load(m_ptr + j[:, None] * stride_m + cols[None, :], mask=kept[:, None] & cmask, other=0.0)
        dw += tl.sum(g * (x.to(ACC) + m.to(ACC)), axis=1)  # x is 0 on kept rows, m on skipped ones
        dx = tl.where(kept[:, None], 0.0, g * w)
        tl.store(dx_ptr + rows[:, None] * stride_dx + cols[None, :], dx.to(dx_ptr.dtype.element_ty),
                 mask=rmask[:, None] & cmask)
        tl.store(dh_ptr + j[:, None] * stride_dh + cols[None, :], g.to(dh_ptr.dtype.element_ty),
                 mask=kept[:, None] & cmask)
        tl.store(dm_ptr + j[:, None] * stride_dm + cols[None, :], (g * w).to(dm_ptr.dtype.element_ty),
                 mask=kept[:, None] & cmask)
    tl.store(dw_ptr + rows, dw.to(dw_ptr.dtype.element_ty), mask=rmask)


def kept_positions(idx: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of idx: pos[n] = j where idx[j] = n, else -1. idx: [Nk] long, unique. Returns [N] int32."""
    pos = torch.full((n,), -1, dtype=torch.int32, device=idx.device)
    return pos.index_copy_(0, idx, torch.arange(idx.numel(), dtype=torch.int32, device=idx.device))


class StringMerge(torch.autograd.Function):
    """Autograd wrapper of the Triton STRing merge; arguments as `pmod_kernels.reference.string_merge`."""

    @staticmethod
    def forward(ctx, x, w_tok, idx, h_mid, m):
        x, w_tok, h_mid, m = x.contiguous(), w_tok.contiguous(), h_mid.contiguous(), m.contiguous()
        N, C = x.shape
        pos = kept_positions(idx, N)  # [N]
        out = torch.empty_like(x)  # [N, C]
        if N and C:
            bc = block_c(C)
            _merge_fwd_kernel[(triton.cdiv(N, BLOCK_R), triton.cdiv(C, bc))](
                x, w_tok, pos, h_mid, m, out,
                N, C, x.stride(0), h_mid.stride(0), m.stride(0), out.stride(0),
                ACC=acc_dtype(x.dtype)[0], BLOCK_R=BLOCK_R, BLOCK_C=bc,
            )
        ctx.save_for_backward(x, w_tok, pos, m)
        ctx.h_dtype = h_mid.dtype
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        x, w_tok, pos, m = ctx.saved_tensors
        g = g.contiguous()
        N, C = x.shape
        dx, dw = torch.empty_like(x), torch.empty_like(w_tok)  # every row is written
        dh, dm = torch.empty(m.shape, dtype=ctx.h_dtype, device=m.device), torch.empty_like(m)  # [Nk, C]
        if N:
            _merge_bwd_kernel[(triton.cdiv(N, BLOCK_R),)](
                g, x, w_tok, pos, m, dx, dw, dh, dm,
                N, C, g.stride(0), x.stride(0), m.stride(0), dx.stride(0), dh.stride(0), dm.stride(0),
                ACC=acc_dtype(x.dtype)[0], BLOCK_R=BLOCK_R, BLOCK_C=block_c(C),
            )
        return dx, dw, None, dh, dm
