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
from pmod.modeling.mod import RoutingRecord, mod_layer_forward
from pmod.modeling.mrope import mrope_cos_sin
from pmod.modeling.rope import rope_cos_sin, rope_inv_freq
from pmod.packing import Layout

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
        self.gradient_checkpointing = False
        self._inv_freq: dict[torch.device, torch.Tensor] = {}

    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        dev = position_ids.device
        if dev not in self._inv_freq:  # computed lazily: the module may have been built on the meta device
            self._inv_freq[dev] = rope_inv_freq(self.config.text, dev)
        if position_ids.dim() == 2:  # [3, N]: M-RoPE
            t = self.config.text
            return mrope_cos_sin(position_ids, self._inv_freq[dev], t.mrope_section, dtype, t.mrope_interleaved)
        return rope_cos_sin(position_ids, self._inv_freq[dev], dtype)

    def _run(self, fn, *args):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def forward(self, x: torch.Tensor, layout: Layout, ctx: AttnContext, record: bool = True) -> tuple[torch.Tensor, list[RoutingRecord]]:
        """Prefill or training over packed tokens x [N, C]; returns the final-normed hidden states."""
        cos, sin = self.rope(layout.position_ids if layout.rope_positions is None else layout.rope_positions, x.dtype)
        records: list[RoutingRecord] = []
        route = layout.has_vision
        if route:
            layout.prepare_routes(self.ratios.values())  # every layer's plan in one host-to-device copy
        for i, layer in enumerate(self.layers):
            x = x.to(layer.input_layernorm.weight.device)
            router = self.routers[str(i)] if (route and str(i) in self.routers) else None
            if router is None:
                x = self._run(layer, x, cos.to(x.device), sin.to(x.device), ctx)
                if layout.inject is not None and i in layout.inject:
                    x = x.index_add(0, layout.vision_dest, layout.inject[i].to(x.dtype))
                continue
            def step(x, layer=layer, router=router, i=i):
                return mod_layer_forward(layer, router, i, self.ratios[i], self.config.mod, x, cos, sin, layout, ctx, record)
            x, rec = self._run(step, x)
            if rec is not None:
                records.append(rec)
            if layout.inject is not None and i in layout.inject:  # DeepStack: after a dense or MoD layer alike
                x = x.index_add(0, layout.vision_dest, layout.inject[i].to(x.dtype))
        return self.norm(x), records

    def decode(self, x: torch.Tensor, positions: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        """One decode step: x [B, C] text tokens at `positions` [B]; every layer runs dense."""
        cos, sin = self.rope(positions, x.dtype)
        for layer in self.layers:
            x = layer(x.to(layer.input_layernorm.weight.device), cos.to(x.device), sin.to(x.device), ctx)
        return self.norm(x)
