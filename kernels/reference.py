"""PyTorch reference implementations of the MoD-layer kernels: the oracle the Triton kernels are tested against.

Each function is the exact expression `pmod/modeling/mod.py` evaluates, so calling it instead of the inline code
changes no bit of the forward, and autograd gives the backward. Everything is differentiable and device-agnostic.
Legend: N packed tokens, C hidden size, Nv routed (vision) rows, Nk kept rows.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pmod.routing import ELEMENTWISE_NORMS, elementwise_norm, normalize_router_logits

__all__ = ["ELEMENTWISE_NORMS", "gather_rows", "router_weights", "router_weights_rowwise", "string_merge"]


def router_weights(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rows: torch.Tensor,
    norm: str = "tanh",
    scale: float = 0.2,
    shift: float = 1.0,
) -> torch.Tensor:
    """Router weight w = scale * f(x[rows] @ weight.T + bias) + shift, f in ELEMENTWISE_NORMS (TanhNorm by default).

    x: [N, C]; weight: [1, C] (an `nn.Linear(C, 1)` weight) or [C]; bias: [1] or None; rows: [Nv] long.
    Returns w: [Nv], dtype of x. Same op sequence as `router(x.index_select(0, rows))` followed by
    `pmod.routing.normalize_router_logits`, so the values are bit-identical to mod.py's at valid slots.
    """
    r = F.linear(x.index_select(0, rows), weight.view(1, -1), bias).squeeze(-1)  # [Nv]
    return elementwise_norm(r, norm, scale, shift)


def router_weights_rowwise(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    vision_dest: torch.Tensor,
    vision_slots: torch.Tensor,
    vision_flat: torch.Tensor,
    norm: str = "tanh",
    scale: float = 0.2,
    shift: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Router weights for any norm (softmax too, which normalises over a row's vision tokens).

    vision_dest [Nv] packed index of each vision token; vision_slots [B, V] (N = x.shape[0] where padded);
    vision_flat [Nv] flat [B, V] index. Returns (w_v [Nv] in vision_dest order, w [B, V], 0 on padding).
    """
    if norm in ELEMENTWISE_NORMS:
        w_v = router_weights(x, weight, bias, vision_dest, norm, scale, shift)
        B, V = vision_slots.shape
        return w_v, w_v.new_zeros(B * V).index_copy(0, vision_flat, w_v).view(B, V)
    r_v = F.linear(x.index_select(0, vision_dest), weight.view(1, -1), bias).squeeze(-1)  # [Nv]
    r = r_v.new_zeros(vision_slots.numel()).index_copy(0, vision_flat, r_v).view(vision_slots.shape)  # [B, V]
    w = normalize_router_logits(r, vision_slots < x.shape[0], norm, scale, shift)  # [B, V]
    return w.view(-1).index_select(0, vision_flat), w


def gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x[idx]: the kept tokens in the packed layout. x: [N, C]; idx: [Nk] long, unique. Returns [Nk, C]."""
    return x.index_select(0, idx)


def string_merge(
    x: torch.Tensor, w_tok: torch.Tensor, idx: torch.Tensor, h_mid: torch.Tensor, m: torch.Tensor
) -> torch.Tensor:
    """STRing merge of a MoD layer: out = x * w everywhere, except kept rows idx[j], which get h_mid[j] + w * m[j].

    x: [N, C] layer input; w_tok: [N] router weight per token (1 on text), dtype of x; idx: [Nk] long, unique
    (ascending in mod.py); h_mid, m: [Nk, C] the kept tokens after attention and the MLP delta. Returns [N, C].
    """
    return (x * w_tok[:, None]).index_copy(0, idx, h_mid + w_tok.index_select(0, idx)[:, None] * m)
