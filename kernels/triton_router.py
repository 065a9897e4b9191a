"""Triton router of a MoD layer: gathered GEMV x[rows] @ w + b fused with the weight normalisation, and its backward.

The forward reads the routed rows of x in place (no [Nv, C] copy) and writes only w [Nv]; it rounds to the output
dtype where PyTorch's eager ops round (after the linear, after f, after the scale), so bf16 weights and therefore the
top-k choice match the reference. The backward writes dx rows, and per-block partial sums of dweight / dbias that
are reduced on the host side of the graph (no atomics: deterministic). Rows must be unique.
Legend: N packed tokens, C hidden size, Nv routed rows, P row blocks.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from .triton_common import acc_dtype, block_c

__all__ = ["NORM_CODES", "RouterWeights"]

NORM_CODES = {"none": 0, "tanh": 1, "sigmoid": 2}
BLOCK_R = 16


@triton.jit
def _tanh(r):
    e = tl.exp(-2.0 * tl.abs(r))  # in (0, 1]: no overflow for any r
    t = (1.0 - e) / (1.0 + e)
    return tl.where(r < 0, -t, t)


@triton.jit
def _sigmoid(r):
    return 1.0 / (1.0 + tl.exp(-r))


@triton.jit
def _router_fwd_kernel(
    x_ptr, w_ptr, b_ptr, rows_ptr, out_ptr, r_ptr,
    n_rows, C, stride_x, scale, shift,
    HAS_BIAS: tl.constexpr, NORM: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # [R]
    rmask = offs < n_rows
    rows = tl.load(rows_ptr + offs, mask=rmask, other=0).to(tl.int64)  # [R]
    acc = tl.zeros([BLOCK_R], dtype=ACC)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)  # [BC]
        cmask = cols < C
        xv = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
        wv = tl.load(w_ptr + cols, mask=cmask, other=0.0)
        acc += tl.sum(xv.to(ACC) * wv.to(ACC)[None, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(b_ptr).to(ACC)
    dt = out_ptr.dtype.element_ty
    r = acc.to(dt).to(ACC)  # the linear's output, rounded as F.linear rounds it
    if NORM == 1:
        f = _tanh(r).to(dt).to(ACC)
    elif NORM == 2:
        f = _sigmoid(r).to(dt).to(ACC)
    else:
        f = r
    w = (f * scale).to(dt).to(ACC) + shift
    tl.store(out_ptr + offs, w.to(dt), mask=rmask)
    tl.store(r_ptr + offs, r, mask=rmask)


@triton.jit
def _router_bwd_kernel(
    x_ptr, w_ptr, rows_ptr, r_ptr, g_ptr, dx_ptr, dw_part_ptr, db_part_ptr,
    n_rows, C, stride_x, stride_dx, scale,
    NORM: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid * BLOCK_R + tl.arange(0, BLOCK_R)  # [R]
    rmask = offs < n_rows
    rows = tl.load(rows_ptr + offs, mask=rmask, other=0).to(tl.int64)
    r = tl.load(r_ptr + offs, mask=rmask, other=0.0)
    g = tl.load(g_ptr + offs, mask=rmask, other=0.0).to(ACC)
    if NORM == 1:
        t = _tanh(r)
        df = 1.0 - t * t
    elif NORM == 2:
        s = _sigmoid(r)
        df = s * (1.0 - s)
    else:
        df = tl.full([BLOCK_R], 1.0, ACC)
    dr = tl.where(rmask, g * scale * df, 0.0)  # [R] dL/dr
    tl.store(db_part_ptr + pid, tl.sum(dr, axis=0))
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        cmask = cols < C
        mask = rmask[:, None] & cmask[None, :]
        wv = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(ACC)
        dx = dr[:, None] * wv[None, :]  # [R, BC]
        tl.store(dx_ptr + rows[:, None] * stride_dx + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
        xv = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(ACC)
        tl.store(dw_part_ptr + pid * C + cols, tl.sum(dr[:, None] * xv, axis=0), mask=cmask)


class RouterWeights(torch.autograd.Function):
    """Autograd wrapper of the Triton router; arguments as `pmod_kernels.reference.router_weights`."""

    @staticmethod
    def forward(ctx, x, weight, bias, rows, norm: str, scale: float, shift: float):
        x = x.contiguous()  # [N, C]
        wv = weight.reshape(-1).contiguous()  # [C]
        rows = rows.contiguous()
        n_rows, C = rows.numel(), x.shape[1]
        out = torch.empty(n_rows, dtype=x.dtype, device=x.device)  # [Nv]
        acc, acc_t = acc_dtype(x.dtype)
        r = torch.empty(n_rows, dtype=acc_t, device=x.device)  # [Nv] the linear's output, kept for backward
        if n_rows:
            _router_fwd_kernel[(triton.cdiv(n_rows, BLOCK_R),)](
                x, wv, wv if bias is None else bias, rows, out, r,
                n_rows, C, x.stride(0), float(scale), float(shift),
                HAS_BIAS=bias is not None, NORM=NORM_CODES[norm], ACC=acc, BLOCK_R=BLOCK_R, BLOCK_C=block_c(C),
            )
        ctx.save_for_backward(x, wv, rows, r)
        ctx.norm, ctx.scale, ctx.weight_shape = norm, float(scale), weight.shape
        ctx.bias_shape = None if bias is None else bias.shape
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        x, wv, rows, r = ctx.saved_tensors
        n_rows, C = rows.numel(), x.shape[1]
        P = triton.cdiv(n_rows, BLOCK_R)
        dx = torch.zeros_like(x)  # [N, C]; only the routed rows are written
        acc, acc_t = acc_dtype(x.dtype)
        dw_part = torch.zeros(P, C, dtype=acc_t, device=x.device)  # [P, C]
        db_part = torch.zeros(P, dtype=acc_t, device=x.device)  # [P]
        if n_rows:
            _router_bwd_kernel[(P,)](
                x, wv, rows, r, g.contiguous(), dx, dw_part, db_part,
                n_rows, C, x.stride(0), dx.stride(0), ctx.scale,
                NORM=NORM_CODES[ctx.norm], ACC=acc, BLOCK_R=BLOCK_R, BLOCK_C=block_c(C),
            )
        dweight = dw_part.sum(0).to(wv.dtype).view(ctx.weight_shape)
        dbias = None if ctx.bias_shape is None else db_part.sum().to(wv.dtype).view(ctx.bias_shape)
        return dx, dweight, dbias, None, None, None, None
