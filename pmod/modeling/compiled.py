"""`model.compile()`: the decoder stack of prefill and decode under `torch.compile`, one graph each.

The host still builds every size (`pmod.packing`: the layout, each MoD ratio's route plan); here they enter the
graph as tensors whose shapes carry them (N packed tokens, each plan's kept total and K, the longest row), marked
dynamic, so a new prompt length reuses the graph instead of recompiling. The layers' own code runs unchanged:
`Attention.forward` reaches attention and the cache through `ctx.backend` / `ctx.cache`, and the two objects
passed there (`attention_compiled.py`) are written for tracing (no host lists, no Python-int lengths).
Decode writes into the cache's full-capacity tensors at each row's device length and attends over the whole
capacity under a length mask (gpt-fast's static cache), so every step has the same shapes: one graph for all
steps, which `mode="reduce-overhead"` can replay as a CUDA graph (cache tensors are marked static addresses).
What the graphs do not cover runs eagerly as before: grad-enabled calls (training), labels, continuation chunks, DeepStack
injection, flash-attn, a model split over devices, a cache in CUDA-graph static mode.
Legend: L layers, B rows, N packed tokens, Nk kept tokens, K max kept per row, C hidden, V vocab, S cache slots.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from pmod.modeling.attention_compiled import CollectKV, PackedRows, SlotWriter, TracedAttention, packed_rows
from pmod.modeling.block import AttnContext
from pmod.modeling.mod import routing_record
from pmod.modeling.rope import rope_tables
from pmod.packing import Layout

__all__ = ["CompiledDecoder"]


class Vision(NamedTuple):
    """The layout's vision metadata (`Layout`): dest [Nv], slots [B, V], flat [Nv], text_keep [N + 1]."""

    dest: torch.Tensor
    slots: torch.Tensor
    flat: torch.Tensor
    text_keep: torch.Tensor


class Plan(NamedTuple):
    """One MoD ratio's `RoutePlan`: k [B] kept per row, k_range [K] = arange(max k), the kept tokens' rows."""

    k: torch.Tensor
    k_range: torch.Tensor
    rows: PackedRows


def prefill_stack(model, x, tables, position_ids, inv_freq, full: PackedRows, vision: Vision | None,
                  plans: tuple[Plan, ...], layer_plan: tuple[int, ...], want_kv: bool):
    """The decoder over packed x [N, C]: (final-normed h [N, C], per-layer (k, v) or (), per-MoD-layer (kept, w_tok)).
    `layer_plan[i]` is layer i's index into `plans`, -1 for a dense layer. Mirrors `LanguageModel.forward`."""
    from pmod_kernels.ops import route_eager, string_merge_eager  # plain functions: traced, not opaque ops

    lm = model.language_model
    cos, sin = rope_tables(position_ids, inv_freq, x.dtype) if tables is None else tables  # [N, 1, 2, D/2]
    attn, kv = TracedAttention(), (CollectKV() if want_kv else None)
    ctx = AttnContext(attn, full, kv)
    routes = []
    for i, layer in enumerate(lm.layers):
        if layer_plan[i] < 0:
            x = layer(x, cos, sin, ctx)
            continue
        plan, spec, router = plans[layer_plan[i]], lm.route_specs[i], lm.routers[str(i)]
        idx, w_tok, kept = route_eager(  # idx [Nk] ascending, w_tok [N], kept [B, K]; sizes from shapes
            x, router.weight, router.bias, vision.dest, vision.slots, vision.flat, vision.text_keep,
            plan.k, plan.k_range.shape[0], plan.rows.row.shape[0], spec.norm, spec.scale, spec.shift, "torch")
        sub = AttnContext(attn, plan.rows, kv)
        h_mid = layer.attend(x.index_select(0, idx), cos.index_select(0, idx), sin.index_select(0, idx), sub)  # [Nk, C]
        scale = w_tok if spec.string else torch.ones_like(w_tok)  # STRing off (an ablation): nothing scales
        x = string_merge_eager(x, scale, idx, h_mid, layer.feed_forward(h_mid), "torch")  # [N, C]
        routes.append((kept, w_tok))
    kvs = tuple(kv.kv[i] for i in range(len(lm.layers))) if want_kv else ()
    return lm.norm(x), kvs, tuple(routes)


def decode_stack(model, tokens, positions, inv_freq, ks, vs, seqlens, group: tuple[int, ...], heads_first: bool):
    """One decode step over full-capacity caches: (logits [B, V] float32, new seqlens per group, next positions [B]).
    ks/vs: per layer, written in place at each row's slot `seqlens[group[i]]`; seqlens: one [B] per length group."""
    lm = model.language_model
    x = lm.embed_tokens(tokens)  # [B, C]
    cos, sin = rope_tables(positions, inv_freq, x.dtype)  # [B, 1, 2, D/2]
    writer = SlotWriter(ks, vs, seqlens, group, heads_first)
    ctx = AttnContext(TracedAttention(heads_first), cache=writer, decode=True)
    for layer in lm.layers:
        x = layer(x, cos, sin, ctx)
    logits = model.lm_head(lm.norm(x)).float()  # [B, V]
    return logits, writer.new, positions + 1


class CompiledDecoder:
    """The compiled prefill and decode of one model (`PmodForConditionalGeneration.compile`)."""

    def __init__(self, model, **torch_compile_kwargs):
        self.model = model
        kwargs = {"fullgraph": True, **torch_compile_kwargs}
        self.prefill_fn = torch.compile(prefill_stack, **kwargs)
        self.decode_fn = torch.compile(decode_stack, **kwargs)
        self._one_device: tuple = (None, False)

    # --- which calls the graphs take ------------------------------------------------------------
    def _takes(self, backend) -> bool:
        """Inference (no grad) with SDPA or eager attention (flash-attn's calls are not traced), on one device."""
        if torch.is_grad_enabled() or backend.name not in ("sdpa", "eager"):
            return False
        dev = self.model.device
        if self._one_device[0] != dev:  # checked again only after the model moves
            self._one_device = (dev, len({p.device for p in self.model.language_model.parameters()}) == 1)
        return self._one_device[1]

    def takes_prefill(self, layout: Layout, backend, labels, extend: bool) -> bool:
        # a training-free reduction changes the layout mid-stack: it stays eager
        return (labels is None and not extend and layout.inject is None and self.model.language_model.reduction is None
                and self._takes(backend))

    def takes_decode(self, cache, backend) -> bool:
        return not cache.static and cache.steps_left() >= 1 and self._takes(backend)  # else eager grows the cache

    # --- prefill ---------------------------------------------------------------------------------
    def prefill(self, x: torch.Tensor, layout: Layout, ctx: AttnContext, record: bool):
        """What `LanguageModel.forward(x, layout, ctx, record)` returns, through the compiled graph; fills ctx.cache."""
        lm = self.model.language_model
        L = len(lm.layers)
        route = layout.has_vision
        ratios = list(dict.fromkeys(lm.ratios.values())) if route else []
        if route:
            layout.prepare_routes(ratios)
        rplans = [layout.route(r) for r in ratios]
        plans = tuple(Plan(_dyn(p.k_dev, 0), _dyn(torch.arange(p.k_max, device=x.device), 0), packed_rows(layout, p.varlen))
                      for p in rplans)
        layer_plan = tuple(ratios.index(lm.ratios[i]) if route and i in lm.ratios else -1 for i in range(L))
        vision = None
        if route:
            vision = Vision(_dyn(layout.vision_dest, 0), _dyn(layout.vision_slots, 0, 1), _dyn(layout.vision_flat, 0),
                            _dyn(layout.text_keep(), 0))
        tables = None if layout.rope_positions is None else lm.rope_tables(layout.rope_positions, x.dtype)
        h, kvs, routes = self.prefill_fn(self.model, _dyn(x, 0), tables, _dyn(layout.position_ids, 0),
                                         lm.inv_freq(x.device), packed_rows(layout, layout.varlen), vision, plans,
                                         layer_plan, ctx.cache is not None)
        if ctx.cache is not None:
            for i, (k, v) in enumerate(kvs):
                ctx.cache.store(i, k, v, layout.varlen if layer_plan[i] < 0 else rplans[layer_plan[i]].varlen)
        records = []
        if record:
            mod_layers = [i for i in range(L) if layer_plan[i] >= 0]
            for i, (kept, w_tok) in zip(mod_layers, routes):
                records.append(routing_record(lm.route_specs[i], rplans[layer_plan[i]], layout, kept, w_tok))
        return h, records

    # --- decode ----------------------------------------------------------------------------------
    def decode_step(self, token_ids: torch.Tensor, cache) -> torch.Tensor:
        """`model.decode_step` through the compiled graph: the same logits [B, V]; the cache advances as eagerly."""
        uniq: dict[int, int] = {}
        for s in cache.seqlens:  # layers sharing a lengths tensor (one per MoD ratio, one for the dense layers)
            uniq.setdefault(id(s), len(uniq))
        group = tuple(uniq[id(s)] for s in cache.seqlens)
        # a prefill's lengths are views into its one upload buffer: owned copies, or the offset would be a guard
        firsts = [s if s.storage_offset() == 0 else s.clone() for s in {id(s): s for s in cache.seqlens}.values()]
        slot = cache.slot_dim
        ks = [_static(_dyn(k, 0, slot)) for k in cache.k]
        vs = [_static(_dyn(v, 0, slot)) for v in cache.v]
        lm = self.model.language_model
        logits, new, positions = self.decode_fn(self.model, _dyn(token_ids, 0), _dyn(cache.positions, 0),
                                                lm.inv_freq(token_ids.device), ks, vs, [_dyn(s, 0) for s in firsts],
                                                group, cache.heads_first)
        cache.seqlens = [new[g] for g in group]
        cache.advance_host()
        cache.positions = positions
        return logits


def _dyn(t: torch.Tensor, *dims: int) -> torch.Tensor:
    """Mark sizes that vary between calls dynamic up front (one graph, not one per size); 0/1 stay specialised."""
    for d in dims:
        torch._dynamo.maybe_mark_dynamic(t, d)
    return t


def _static(t: torch.Tensor) -> torch.Tensor:
    """A tensor mutated in place by the graph: a static address, so reduce-overhead's CUDA graphs keep it an input."""
    if t.is_cuda:
        torch._dynamo.mark_static_address(t)
    return t
