"""pmod_kernels: fused kernels for the Mixture-of-Depths layer, each with a PyTorch reference.

Installed under the import name `pmod_kernels` (the folder is `kernels/`; `kernels` on PyPI is Hugging Face's kernel
hub, which transformers probes for). Every public function takes `backend`:
  None      pick once from the inputs: "triton" for CUDA tensors when triton is importable, else "torch"
            (gather_rows excepted: "torch" everywhere, where the Triton kernel measured slower);
  "torch"   the reference (`pmod_kernels.reference`): the exact ops of pmod/modeling/mod.py, autograd backward;
  "triton"  the Triton kernels with their hand-written backward (CPU tensors work under TRITON_INTERPRET=1).
Legend: N packed tokens, C hidden size, Nv routed (vision) rows, Nk kept rows.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys

if __name__ != "pmod_kernels":
    # This folder is also importable as `kernels` wherever the repository root is on sys.path (`python -m` from the
    # root, pytest), and transformers imports `kernels` to probe for Hugging Face's kernel hub (a package without
    # metadata gets imported). A second copy would run ops.py again, and custom_op's re-registration of pmod::route
    # destroys the first registration while pmod_kernels.route still calls through it: a dangling operator handle,
    # hence the intermittent std::bad_alloc / vector::reserve (kernels/ops.py). Any other name is pmod_kernels.
    try:
        _real = importlib.import_module("pmod_kernels")
    except ModuleNotFoundError:  # not installed: this is the only copy, nothing to alias
        _real = None
    if _real is not None:
        for _name, _mod in list(sys.modules.items()):
            if _name == "pmod_kernels" or _name.startswith("pmod_kernels."):
                sys.modules[__name__ + _name[len("pmod_kernels"):]] = _mod  # `from . import ops` below finds these
        sys.modules[__name__] = _real  # what the importer hands out; the rest of this copy only re-binds names

import torch

from . import reference
from .reference import ELEMENTWISE_NORMS

__all__ = ["BACKENDS", "ELEMENTWISE_NORMS", "gather_rows", "pick_backend", "route", "router_weights", "string_merge",
           "string_merge_op"]

BACKENDS = ("torch", "triton")
_HAS_TRITON = importlib.util.find_spec("triton") is not None


def pick_backend(x: torch.Tensor, backend: str | None = None) -> str:
    """The backend a call on `x` uses: `backend` if given (validated), else triton on CUDA when available."""
    if backend is None:
        return "triton" if x.is_cuda and _HAS_TRITON else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; expected one of {BACKENDS} or None")
    return backend


def router_weights(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rows: torch.Tensor,
    norm: str = "tanh",
    scale: float = 0.2,
    shift: float = 1.0,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Router weights of the routed tokens: w = scale * f(x[rows] @ weight.T + bias) + shift (TanhNorm by default).

    x: [N, C] float (bf16/fp16/fp32/fp64); weight: [1, C] or [C] and bias: [1] or None, dtype of x;
    rows: [Nv] long, unique; norm: one of ELEMENTWISE_NORMS. Returns w: [Nv], dtype of x. Gradients reach
    x (routed rows only), weight and bias. The Triton path never materialises x[rows].
    """
    if norm not in ELEMENTWISE_NORMS:
        raise ValueError(f"router norm {norm!r} is not elementwise; expected one of {ELEMENTWISE_NORMS}")
    if weight.numel() != x.shape[-1] or weight.dtype != x.dtype:
        raise ValueError(
            f"router weight {tuple(weight.shape)} {weight.dtype} does not fit x {tuple(x.shape)} {x.dtype}"
        )
    if pick_backend(x, backend) == "torch":
        return reference.router_weights(x, weight, bias, rows, norm, scale, shift)
    from .triton_router import RouterWeights

    return RouterWeights.apply(x, weight, bias, rows, norm, scale, shift)


def gather_rows(x: torch.Tensor, idx: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """x[idx], the kept tokens in the packed layout. x: [N, C]; idx: [Nk] long, unique. Returns [Nk, C], dtype of x.

    Unlike the other two, this one defaults to the reference on CUDA as well: a plain row gather is what
    `index_select` already does at copy speed, and the Triton kernel measured 3x slower (H200, bf16, 2704 x 4096
    rows: 0.070 vs 0.021 ms forward, 0.44 vs 0.14 ms with backward; BENCHMARKS.md). backend="triton" still runs it.
    """
    if pick_backend(x, backend or "torch") == "torch":
        return reference.gather_rows(x, idx)
    from .triton_gather import GatherRows

    return GatherRows.apply(x, idx)


def string_merge(
    x: torch.Tensor,
    w_tok: torch.Tensor,
    idx: torch.Tensor,
    h_mid: torch.Tensor,
    m: torch.Tensor,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """STRing merge: out = x * w_tok[:, None], except rows idx[j], which get h_mid[j] + w_tok[idx[j]] * m[j].

    x: [N, C] layer input; w_tok: [N] router weight per token (1 on text), dtype of x; idx: [Nk] long, unique;
    h_mid, m: [Nk, C], dtype of x. Returns [N, C]. Gradients reach x, w_tok, h_mid and m.
    """
    N, C = x.shape
    if w_tok.shape != (N,) or h_mid.shape != (idx.numel(), C) or m.shape != h_mid.shape:
        raise ValueError(
            f"string_merge shapes do not fit: x {tuple(x.shape)}, w_tok {tuple(w_tok.shape)}, idx {tuple(idx.shape)}, "
            f"h_mid {tuple(h_mid.shape)}, m {tuple(m.shape)}; expected w_tok [N], h_mid and m [Nk, C]"
        )
    if pick_backend(x, backend) == "torch":
        return reference.string_merge(x, w_tok, idx, h_mid, m)
    from .triton_merge import StringMerge

    return StringMerge.apply(x, w_tok, idx, h_mid, m)


from . import ops  # noqa: E402  (registers pmod::route, pmod::string_merge)

# What the MoD layer calls: the registered operators (one top-level operator each), or with PMOD_FUSED_OPS=0 their
# bodies as plain functions (same values). The operators stay reachable as ops.route / ops.string_merge_op.
route = ops.route if ops.FUSED else ops.route_eager
string_merge_op = ops.string_merge_op if ops.FUSED else ops.string_merge_eager
