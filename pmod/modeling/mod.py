"""One Mixture-of-Depths layer: route a row's vision tokens, run the layer on the kept ones, STRing-merge.

For a layer input h (residual stream) and router weight w = norm(router(h)):
  kept vision token:    h_mid + w * m     (h_mid = h + Attn(norm(h)), m = MLP(norm(h_mid)))
  skipped vision token: w * h
  text token:           h_mid + m         (w = 1: text always passes, untouched by the router)
The top-k choice carries no gradient; the router learns through w only (STRing).
Legend: N packed tokens, Nk kept tokens, B rows, V vision slots per row, K max kept per row.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pmod.config import ModConfig
from pmod.modeling.block import AttnContext, DecoderLayer
from pmod.packing import Layout
from pmod.routing import normalize_router_logits, select_top_k
from pmod_kernels import ELEMENTWISE_NORMS, gather_rows, router_weights, string_merge

__all__ = ["RoutingRecord", "mod_layer_forward"]


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
    layer_idx: int,
    ratio: float,
    mod: ModConfig,
    x: torch.Tensor,  # [N, C]
    cos: torch.Tensor,  # [N, D]
    sin: torch.Tensor,
    layout: Layout,
    ctx: AttnContext,
    record: bool = True,
) -> tuple[torch.Tensor, RoutingRecord | None]:
    plan = layout.route(ratio)
    B, V = layout.vision_slots.shape
    N = x.shape[0]

    # Router on the layer input of the vision tokens, laid out per row. Kernels: Triton on CUDA, else the reference.
    if mod.norm in ELEMENTWISE_NORMS:  # gather, GEMV and norm fused; same values as normalize_router_logits
        w_v = router_weights(x, router.weight, router.bias, layout.vision_dest, mod.norm, mod.norm_scale, mod.norm_bias)
        w = w_v.new_zeros(B * V).index_copy(0, layout.vision_flat, w_v).view(B, V)  # [B, V], 0 on padding
    else:  # softmax normalises over each row's vision tokens
        r_v = router(x.index_select(0, layout.vision_dest)).squeeze(-1)  # [Nv]
        r = r_v.new_zeros(B * V).index_copy(0, layout.vision_flat, r_v).view(B, V)  # [B, V]
        w = normalize_router_logits(r, layout.vision_valid, mod.norm, mod.norm_scale, mod.norm_bias)  # [B, V]
        w_v = w.view(-1).index_select(0, layout.vision_flat).to(x.dtype)  # [Nv], in vision_dest order
    if plan.uniform:  # every slot valid and every chosen slot used (e.g. batch 1): fewer launches, same choice
        slots = w.detach().topk(plan.k_max, dim=-1, sorted=True).indices  # [B, K]
        kept_vision = layout.vision_slots.gather(1, slots)  # [B, K] packed indices
        keep = layout.text_keep().index_fill(0, kept_vision.flatten(), True)  # [N + 1]
        chosen = None
    else:
        slots, chosen = select_top_k(w, layout.vision_valid, plan.k_dev, plan.k_max)  # [B, K]
        kept_vision = layout.vision_slots.gather(1, slots)  # [B, K] packed indices
        # Packed indices this layer processes: all text plus the chosen vision tokens; N is a sink slot.
        keep = layout.text_keep().scatter(0, torch.where(chosen, kept_vision, N).flatten(), True)  # [N + 1]
    idx = torch.nonzero_static(keep[:N], size=plan.varlen.total).squeeze(1)  # [Nk], ascending, in sequence order

    w_tok = torch.ones(N, dtype=x.dtype, device=x.device).index_copy(0, layout.vision_dest, w_v)  # [N], 1 on text

    h = gather_rows(x, idx)  # [Nk, C]
    sub = AttnContext(ctx.backend, plan.varlen, ctx.cache, decode=False, extend=ctx.extend)
    h_mid = layer.attend(h, cos.index_select(0, idx), sin.index_select(0, idx), sub)
    m = layer.feed_forward(h_mid)
    out = string_merge(x, w_tok, idx, h_mid, m)  # STRing: x * w, kept rows h_mid + w * m

    rec = None
    if record:
        if chosen is None:
            chosen = torch.ones_like(slots, dtype=torch.bool)
        pos = layout.out_index[kept_vision.clamp(max=N - 1)] % layout.merged_len  # merged position (left padding included)
        pos = torch.where(chosen, pos, torch.iinfo(torch.long).max).sort(dim=1).values
        rec = RoutingRecord(
            layer=layer_idx,
            ratio=ratio,
            kept=torch.where(chosen, pos, -1),  # chosen[b, j] = j < k[b], so the sorted valid ones lead
            weights=layout.pad(w_tok.detach()).masked_fill(~layout.merged_mask(), 0.0),
            num_kept=plan.k,
        )
    return out, rec
