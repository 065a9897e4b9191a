"""One Mixture-of-Depths layer: route a row's vision tokens, run the layer on the kept ones, STRing-merge.

For a layer input h (residual stream) and router weight w = norm(router(h)):
  kept vision token:    h_mid + w * m     (h_mid = h + Attn(norm(h)), m = MLP(norm(h_mid)))
  skipped vision token: w * h
  text token:           h_mid + m         (w = 1: text always passes, untouched by the router)
The top-k choice carries no gradient; the router learns through w only (STRing).
Two fused operators do the routing and the merge (`pmod::route`, `pmod::string_merge` in pmod_kernels): Triton
on CUDA, the PyTorch reference elsewhere; `kernel_backend` ("auto", "torch", "triton") picks.
Legend: N packed tokens, Nk kept tokens, B rows, V vision slots per row, K max kept per row.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pmod.modeling.block import AttnContext, DecoderLayer
from pmod.packing import Layout, RoutePlan
import pmod_kernels  # a module import: pmod_kernels.reference imports pmod.routing, so pmod may load first

__all__ = ["RouteSpec", "RoutingRecord", "mod_layer_forward"]


@dataclass(frozen=True)
class RouteSpec:
    """What routes at one MoD layer: its index, kept ratio and router norm (w = scale * f(r) + shift)."""

    layer: int
    ratio: float
    norm: str = "tanh"
    scale: float = 0.2
    shift: float = 1.0
    string: bool = True  # False (an ablation): no STRing scaling; kept tokens get h_mid + m, skipped ones pass as h


@dataclass
class RoutingRecord:
    """What one MoD layer did: `kept` [B, K] merged-sequence positions of kept vision tokens (ascending,
    -1 padded), `weights` [B, M] router weights w (1 on text, 0 on padding)."""

    layer: int
    ratio: float
    kept: torch.Tensor
    weights: torch.Tensor
    num_kept: list[int]


def mod_layer_forward(
    layer: DecoderLayer,
    router: nn.Linear,
    spec: RouteSpec,
    x: torch.Tensor,  # [N, C]
    cos: torch.Tensor,  # [N, 1, 2, D/2] (`rope_tables`)
    sin: torch.Tensor,
    layout: Layout,
    ctx: AttnContext,
    record: bool = True,
    kernel_backend: str = "auto",
) -> tuple[torch.Tensor, RoutingRecord | None]:
    plan = layout.route(spec.ratio)  # k per row, built on the host (uniform rows and ragged ones alike)
    idx, w_tok, kept = pmod_kernels.route(  # idx [Nk] ascending; w_tok [N]; kept [B, K]
        x, router.weight, router.bias, layout.vision_dest, layout.vision_slots, layout.vision_flat, layout.text_keep(),
        plan.k_dev, plan.k_max, plan.varlen.total, spec.norm, spec.scale, spec.shift, kernel_backend,
    )
    sub = AttnContext(ctx.backend, plan.varlen, ctx.cache, decode=False, extend=ctx.extend)
    h_mid = layer.attend(x.index_select(0, idx), cos.index_select(0, idx), sin.index_select(0, idx), sub)  # [Nk, C]
    scale = w_tok if spec.string else torch.ones_like(w_tok)  # STRing off: the router only chooses, nothing scales
    out = pmod_kernels.string_merge_op(x, scale, idx, h_mid, layer.feed_forward(h_mid), kernel_backend)  # [N, C]
    return out, (routing_record(spec, plan, layout, kept, w_tok) if record else None)


def routing_record(spec: RouteSpec, plan: RoutePlan, layout: Layout, kept: torch.Tensor, w_tok: torch.Tensor) -> RoutingRecord:
    """The layer's record from the route op's outputs, in a fixed number of operators."""
    N = w_tok.shape[0]
    chosen = kept < N  # [B, K]
    pos = layout.out_index[kept.clamp(max=N - 1)] % layout.merged_len  # merged position (left padding included)
    pos = torch.where(chosen, pos, torch.iinfo(torch.long).max).sort(dim=1).values
    return RoutingRecord(
        layer=spec.layer,
        ratio=spec.ratio,
        kept=torch.where(chosen, pos, -1),  # chosen[b, j] = j < k[b], so the sorted valid ones lead
        weights=layout.pad(w_tok.detach()).masked_fill(~layout.merged_mask(), 0.0),
        num_kept=plan.k,
    )
