"""The LLaMA-family language model with MoD routers at the schedule's layers.

Routers live beside the layers (`routers[str(i)]`, a Linear(C, 1)), not inside them: a converted
dense checkpoint keeps its layer names, and a layer is the same module whether it routes or not.
Legend: N packed tokens, B rows, C hidden, V vocab.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from pmod.config import PmodConfig
from pmod.modeling.block import AttnContext, DecoderLayer, RMSNorm
from pmod.modeling.mod import RouteSpec, RoutingRecord, mod_layer_forward
from pmod.modeling.mrope import mrope_cos_sin
from pmod.modeling.rope import rope_cos_sin, rope_inv_freq, rope_tables, tables_from_cos_sin
from pmod.packing import Layout
from pmod.reduction.policy import Reducer
from pmod.reduction.spec import ReductionSpec

__all__ = ["LanguageModel"]


class LanguageModel(nn.Module):
    def __init__(self, config: PmodConfig):
        super().__init__()
        t = config.text
        self.config = config
        self.embed_tokens = nn.Embedding(t.vocab_size, t.hidden_size, padding_idx=None)
        self.layers = nn.ModuleList(DecoderLayer(t, i) for i in range(t.num_hidden_layers))
        self.norm = RMSNorm(t.hidden_size, t.rms_norm_eps)
        self.ratios = config.mod_ratios  # {layer: ratio}
        self.routers = nn.ModuleDict({str(i): nn.Linear(t.hidden_size, 1, bias=config.mod.router_bias) for i in self.ratios})
        m = config.mod
        self.route_specs = {i: RouteSpec(i, r, m.norm, m.norm_scale, m.norm_bias, m.string) for i, r in self.ratios.items()}
        self.reduction: ReductionSpec | None = None  # a training-free drop of vision tokens (pmod.reduction), prefill only
        self.kernel_backend = "auto"  # pmod_kernels backend of the MoD ops: "auto", "torch" or "triton"
        self.gradient_checkpointing = False
        self._inv_freq: dict[torch.device, torch.Tensor] = {}

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        if device not in self._inv_freq:  # computed lazily: the module may have been built on the meta device
            self._inv_freq[device] = rope_inv_freq(self.config.text, device)
        return self._inv_freq[device]

    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [N, D] (what scripts hooking the attention use with `apply_rope`); position_ids [3, N]: M-RoPE."""
        if position_ids.dim() == 2:  # [3, N]: M-RoPE
            t = self.config.text
            return mrope_cos_sin(position_ids, self.inv_freq(position_ids.device), t.mrope_section, dtype, t.mrope_interleaved)
        return rope_cos_sin(position_ids, self.inv_freq(position_ids.device), dtype)

    def rope_tables(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The layers' RoPE inputs: cos, signed sin [N, 1, 2, D/2] (`pmod.modeling.rope.rope_tables`)."""
        if position_ids.dim() == 2:  # M-RoPE: its cos/sin [N, D] laid out as tables (exact)
            return tables_from_cos_sin(*self.rope(position_ids, dtype))
        return rope_tables(position_ids, self.inv_freq(position_ids.device), dtype)

    def _run(self, fn, *args):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def forward(self, x: torch.Tensor, layout: Layout, ctx: AttnContext, record: bool = True) -> tuple[torch.Tensor, list[RoutingRecord]]:
        """Prefill or training over packed tokens x [N, C]; returns the final-normed hidden states."""
        cos, sin = self.rope_tables(layout.position_ids if layout.rope_positions is None else layout.rope_positions, x.dtype)
        records: list[RoutingRecord] = []
        route = layout.has_vision
        if route:
            layout.prepare_routes(self.ratios.values())  # every layer's plan in one host-to-device copy
        # a continuation chunk is not reduced: its last token's attention would span the cached prefix too
        reducer = Reducer(self.reduction, self.layers) if self.reduction is not None and route and not ctx.extend else None
        for i, layer in enumerate(self.layers):
            x, cos, sin = _to(layer, x, cos, sin)
            if reducer is not None:
                x, cos, sin, new = reducer.before(i, x, cos, sin, layout)
                if new is not layout:  # vision tokens left for good: later layers run and cache the rest only
                    layout, route = new, new.has_vision
                    ctx = AttnContext(ctx.backend, layout.varlen, ctx.cache, ctx.decode, ctx.extend)
            router = self.routers[str(i)] if (route and str(i) in self.routers) else None
            if router is None:
                x = self._run(layer, x, cos, sin, ctx)
                if layout.inject is not None and i in layout.inject:
                    x = x.index_add(0, layout.vision_dest, layout.inject[i].to(x.dtype))
                continue
            # layout and ctx bound now: a reduction replaces them later in the loop, and checkpointing re-runs step
            def step(x, cos, sin, layer=layer, router=router, spec=self.route_specs[i], layout=layout, ctx=ctx):
                return mod_layer_forward(layer, router, spec, x, cos, sin, layout, ctx, record, self.kernel_backend)
            x, rec = self._run(step, x, cos, sin)
            if rec is not None:
                records.append(rec)
            if layout.inject is not None and i in layout.inject:  # DeepStack: after a dense or MoD layer alike
                x = x.index_add(0, layout.vision_dest, layout.inject[i].to(x.dtype))
        if reducer is not None:
            x = reducer.restore(x)  # [N, C] of the input layout: a dropped token keeps its state from its drop
        return self.norm(x), records

    def decode(self, x: torch.Tensor, positions: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        """One decode step: x [B, C] text tokens at `positions` [B]; every layer runs dense."""
        cos, sin = self.rope_tables(positions, x.dtype)
        for layer in self.layers:
            x, cos, sin = _to(layer, x, cos, sin)
            x = layer(x, cos, sin, ctx)
        return self.norm(x)


def _to(layer: DecoderLayer, *ts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Tensors moved to the layer's device (a model split over devices); no operator when they are there."""
    dev = layer.input_layernorm.weight.device
    return ts if ts[0].device == dev else tuple(t.to(dev) for t in ts)
