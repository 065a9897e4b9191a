"""The MoD layer's two fused steps as registered operators: `pmod::route` and `pmod::string_merge`.

Each is one dispatcher call (one top-level operator in a profile, one opaque node under torch.compile, so
`fullgraph=True` traces through it) whose body runs the Triton kernels on CUDA or the PyTorch reference
elsewhere. Backward is registered with each op: the merge's in closed form, the route's by re-running
the reference router under autograd (a GEMV; only the router weight w carries gradient, top-k does not).
Legend: N packed tokens, C hidden, B rows, V vision slots per row, K max kept per row, Nk kept tokens.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from . import reference

__all__ = ["FUSED", "route", "route_eager", "string_merge_op", "string_merge_eager"]


def _router_w(x, weight, bias, vision_dest, vision_slots, vision_flat, norm, scale, shift, backend):
    """(w_v [Nv] in vision_dest order, w [B, V] with 0 on padded slots)."""
    if norm in reference.ELEMENTWISE_NORMS:
        from . import router_weights  # Triton on CUDA, else the reference

        w_v = router_weights(x, weight, bias, vision_dest, norm, scale, shift, backend=backend)
        B, V = vision_slots.shape
        return w_v, w_v.new_zeros(B * V).index_copy(0, vision_flat, w_v).view(B, V)
    return reference.router_weights_rowwise(x, weight, bias, vision_dest, vision_slots, vision_flat, norm, scale, shift)


def route_eager(
    x: Tensor, weight: Tensor, bias: Tensor | None, vision_dest: Tensor, vision_slots: Tensor, vision_flat: Tensor,
    text_keep: Tensor, k: Tensor, k_max: int, total: int, norm: str, scale: float, shift: float, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """One MoD layer's routing: router GEMV + norm, per-row top-k among the row's vision tokens, the kept list.

    x [N, C]; vision_dest [Nv]; vision_slots [B, V] (N where padded); vision_flat [Nv]; text_keep [N + 1] bool
    (True on text, a trailing sink at N); k [B] kept per row, k_max = max(k), total = text + kept tokens.
    Returns idx [total] (ascending packed indices the layer processes), w_tok [N] (w on vision, 1 on text) and
    kept [B, K] (packed index of each chosen vision token in descending weight order, N where unchosen).
    """
    N = x.shape[0]
    be = None if backend == "auto" else backend
    w_v, w = _router_w(x, weight, bias, vision_dest, vision_slots, vision_flat, norm, scale, shift, be)
    valid = vision_slots < N  # [B, V]
    slots = w.masked_fill(~valid, float("-inf")).topk(k_max, dim=-1, sorted=True).indices  # [B, K]; ties as torch.topk
    chosen = torch.arange(k_max, device=x.device) < k[:, None]  # [B, K]: slot j < k[b]
    kept = torch.where(chosen, vision_slots.gather(1, slots), N)  # [B, K]
    keep = text_keep.scatter(0, kept.flatten(), True)  # [N + 1]; unchosen land in the sink
    idx = torch.nonzero_static(keep[:N], size=total).squeeze(1)  # [Nk]
    w_tok = torch.ones(N, dtype=x.dtype, device=x.device).index_copy(0, vision_dest, w_v)  # [N]
    return idx, w_tok, kept


# The registered operators are the default (PMOD_FUSED_OPS=0 calls their bodies as plain functions instead).
# They were opt-in for a while: calls failed now and then before the body ran (std::bad_alloc, ValueError
# "vector::reserve") in lmms-eval runs and the demo test. Cause: this file ran twice in one process, as
# pmod_kernels.ops and as kernels.ops (transformers' is_kernels_available() imports `kernels`, which the repository
# root exposes), and torch.library.custom_op on an existing name destroys the earlier registration
# (torch._library.custom_ops.get_library_allowing_overwrite) while the first module's CustomOpDef keeps calling
# the freed operator entry. kernels/__init__.py now hands out pmod_kernels under any other name, so this file runs
# once; tests/test_kernels_alias.py checks it. Ruled out on the way: 20 000 calls in a loop, with and without the
# profiler and with backward, never failed. Known gap: torch.library.opcheck's AOT-dispatch check of pmod::route
# fails ("result type Double can't be cast to ... Long"); eager forward/backward and fake tensors pass
# (tests/test_kernels_ops.py), compiled training through route is untested.
FUSED = os.environ.get("PMOD_FUSED_OPS", "1") != "0"
route = torch.library.custom_op("pmod::route", route_eager, mutates_args=())


@route.register_fake
def _(x, weight, bias, vision_dest, vision_slots, vision_flat, text_keep, k, k_max, total, norm, scale, shift, backend):
    long = dict(dtype=torch.long, device=x.device)
    return x.new_empty(total, **long), x.new_empty(x.shape[0]), x.new_empty(vision_slots.shape[0], k_max, **long)


def _route_setup(ctx, inputs, output):
    x, weight, bias, vision_dest, vision_slots, vision_flat, *_rest = inputs
    ctx.norm, ctx.scale, ctx.shift = inputs[10], inputs[11], inputs[12]
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight, bias if bias is not None else weight.new_empty(0), vision_dest, vision_slots, vision_flat)


def _route_backward(ctx, g_idx, g_w_tok, g_kept):
    x, weight, bias, vision_dest, vision_slots, vision_flat = ctx.saved_tensors
    leaves = [x.detach().requires_grad_(), weight.detach().requires_grad_()]
    if ctx.has_bias:
        leaves.append(bias.detach().requires_grad_())
    with torch.enable_grad():
        w_v, _ = reference.router_weights_rowwise(leaves[0], leaves[1], leaves[2] if ctx.has_bias else None,
                                                  vision_dest, vision_slots, vision_flat, ctx.norm, ctx.scale, ctx.shift)
        grads = torch.autograd.grad(w_v, leaves, g_w_tok.index_select(0, vision_dest), allow_unused=True)
    gb = grads[2] if ctx.has_bias else None
    return (grads[0], grads[1], gb) + (None,) * 11


route.register_autograd(_route_backward, setup_context=_route_setup)


def string_merge_eager(x: Tensor, w_tok: Tensor, idx: Tensor, h_mid: Tensor, m: Tensor, backend: str) -> Tensor:
    """STRing merge (see `pmod_kernels.string_merge`): out = x * w_tok, rows idx: h_mid + w_tok[idx] * m. [N, C]"""
    from . import string_merge

    return string_merge(x, w_tok, idx, h_mid, m, backend=None if backend == "auto" else backend)


string_merge_op = torch.library.custom_op("pmod::string_merge", string_merge_eager, mutates_args=())


@string_merge_op.register_fake
def _(x, w_tok, idx, h_mid, m, backend):
    return torch.empty_like(x)


def _merge_setup(ctx, inputs, output):
    x, w_tok, idx, h_mid, m, _ = inputs
    ctx.save_for_backward(x, w_tok, idx, m)


def _merge_backward(ctx, g):
    x, w_tok, idx, m = ctx.saved_tensors  # g [N, C]
    g_k = g.index_select(0, idx)  # [Nk, C]
    w_k = w_tok.index_select(0, idx)  # [Nk]
    zero = torch.zeros_like(g_k)
    gx = (g * w_tok[:, None]).index_copy(0, idx, zero)  # kept rows: x reaches them only through h_mid
    gw = (g * x).sum(-1).index_copy(0, idx, (g_k * m).sum(-1))  # [N]
    return gx, gw, None, g_k, g_k * w_k[:, None], None


string_merge_op.register_autograd(_merge_backward, setup_context=_merge_setup)
