"""Deterministic host cost: top-level operators of one call (torch.profiler), dense vs p-MoD on the same weights.

A top-level operator is one the profiler records with no operator above it: an ATen op dispatched from Python,
or one of our fused `pmod::` ops. Their number is what the host pays per call, independent of the machine.
"""
from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

from pmod.bench.calls import make_prompt, prefill
from pmod.bench.models import build_dense, with_routers
from pmod.bench.presets import resolve_preset
from pmod.config import ModConfig

__all__ = ["OPS", "TINY_TEXT", "top_level_ops", "op_counts"]

OPS = ("aten::", "pmod::")
TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, vocab_size=512)  # issue 22's shape


def top_level_ops(fn) -> list[str]:
    """Names of the top-level operators one call of `fn` dispatches, in order."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return [e.name for e in prof.events() if e.name.startswith(OPS) and e.cpu_parent is None]


def op_counts(layers: int = 32, images: int = 1, device: str = "cpu") -> dict:
    """Counts for a prefill of `images` x 576 vision + 58 text tokens (dense, p-MoD with the default schedule) and
    one decode step; 'per MoD layer' = (p-MoD - dense) / routed layers, 'decode per layer' = step / layers."""
    p = resolve_preset("cpu")
    p = resolve_preset("cpu", text=dict(p.text, **TINY_TEXT, num_hidden_layers=layers))
    dense = build_dense(p, device)
    pmod = with_routers(dense, ModConfig(), p.router_std)
    prompt = make_prompt(dense.config, [images], p.n_text, device)
    out = {}
    with torch.inference_mode():
        for name, m in (("dense", dense), ("p-MoD", pmod)):
            prefill(m, prompt)  # warm: lazy buffers, first-call caches
            out[f"{name} prefill"] = len(top_level_ops(lambda m=m: prefill(m, prompt)))
        res = prefill(pmod, prompt, reserve=8)
        tok = res.logits.argmax(-1)
        pmod.decode_step(tok, res.past_key_values)
        out["decode step"] = len(top_level_ops(lambda: pmod.decode_step(tok, res.past_key_values)))
    n_mod = len(pmod.language_model.routers)
    out["mod layers"] = n_mod
    out["per MoD layer"] = round((out["p-MoD prefill"] - out["dense prefill"]) / n_mod, 2)
    out["decode per layer"] = round(out["decode step"] / layers, 2)
    return out
