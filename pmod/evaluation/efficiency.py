"""Efficiency of one prefill, measured from the run itself: tokens kept, KV bytes and TFLOPs vs dense.

Numbers come from the layout and the cache object of the actual forward pass; FLOPs use
`pmod.flops` (complete convention) on the same token counts.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pmod.cache import PmodCache
from pmod.config import PmodConfig
from pmod.flops import count_flops, flops_unit, format_flops, kv_cache_bytes
from pmod.packing import Layout, build_layout

__all__ = ["CONVENTION", "Efficiency", "measure_efficiency", "request_efficiency"]

CONVENTION = "FLOPs: complete convention, decoder + lm_head, vision tower not counted"


@dataclass
class Efficiency:
    n_vision: int  # vision tokens of row 0 (the rows of a batch are summed below)
    n_text: int
    kept_per_layer: list[int]  # vision tokens processed by each layer, summed over rows
    kv_bytes: int
    kv_bytes_dense: int
    tflops: float
    tflops_dense: float

    @property
    def kv_ratio(self) -> float:
        return self.kv_bytes / max(self.kv_bytes_dense, 1)

    @property
    def flops_ratio(self) -> float:
        return self.tflops / max(self.tflops_dense, 1e-30)

    @property
    def kept_ratio(self) -> float:
        """Vision tokens processed, averaged over layers, as a fraction of dense."""
        nv = sum(self.kept_per_layer) / max(len(self.kept_per_layer), 1)
        return nv / max(self.n_vision, 1)

    def summary(self) -> str:
        stages = _stages(self.kept_per_layer)
        unit = flops_unit(self.tflops_dense * 1e12)[0]
        return (
            f"vision tokens {self.n_vision}, kept per stage {stages}, "
            f"KV {self.kv_bytes / 2**20:.2f} MiB vs dense {self.kv_bytes_dense / 2**20:.2f} MiB ({100 * self.kv_ratio:.1f} %), "
            f"prefill {format_flops(self.tflops * 1e12, unit, 3)} vs dense {format_flops(self.tflops_dense * 1e12, unit, 3)} "
            f"({100 * self.flops_ratio:.1f} %; {CONVENTION})"
        )


def _stages(kept: list[int]) -> str:
    """Run-length view of kept counts per layer: '8x576 → 486 → ... → 8x86'."""
    out, i = [], 0
    while i < len(kept):
        j = i
        while j + 1 < len(kept) and kept[j + 1] == kept[i]:
            j += 1
        out.append(f"{j - i + 1}x{kept[i]}" if j > i else str(kept[i]))
        i = j + 1
    return " → ".join(out)


def measure_efficiency(config: PmodConfig, layout: Layout, cache: PmodCache | None) -> Efficiency:
    """Efficiency of a prefill over `layout`; KV bytes are read from `cache` (None: computed from the plan)."""
    ratios = config.mod_ratios
    n_vision, lens = layout.n_vision, layout.varlen.lens
    kept = []
    for i in range(config.text.num_hidden_layers):
        kept.append(sum(layout.route(ratios[i]).k) if i in ratios and layout.has_vision else sum(n_vision))
    t = config.text
    per_token = 2 * t.num_key_value_heads * t.head_dim * (cache.k[0].element_size() if cache and cache.k[0] is not None else 2)
    kv = cache.nbytes() if cache is not None else per_token * sum(sum(lens) - sum(n_vision) + k for k in kept)
    kv_dense = per_token * sum(lens) * t.num_hidden_layers
    n_text = [n - v for n, v in zip(lens, n_vision)]
    rep = count_flops(config, n_vision=n_vision, n_text=n_text, convention="complete")
    return Efficiency(
        n_vision=sum(n_vision), n_text=sum(n_text), kept_per_layer=kept, kv_bytes=kv, kv_bytes_dense=kv_dense,
        tflops=rep.total / 1e12, tflops_dense=rep.dense_total / 1e12,
    )


def request_efficiency(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_counts: list[int]) -> dict:
    """Prefill cost of ONE request ([1, T] inputs, feature tokens of each of its images) from the accounting
    modules: `measure_efficiency` (complete convention), `count_flops(convention='paper')` and `kv_cache_bytes` in
    the model's dtype. Sizes come from the layout alone; nothing runs on the device."""
    cfg = model.config
    layout = build_layout(input_ids, attention_mask, image_counts, "cpu", max_length=cfg.model_max_length)
    eff = measure_efficiency(cfg, layout, None)
    paper = count_flops(cfg, n_vision=eff.n_vision, n_text=eff.n_text, convention="paper")
    kv = kv_cache_bytes(cfg, n_vision=eff.n_vision, n_text=eff.n_text, dtype=model.dtype, convention="complete")
    return {
        "n_images": len(image_counts), "n_vision": eff.n_vision, "n_text": eff.n_text,
        "kept_ratio": eff.kept_ratio if eff.n_vision else None,
        "tflops": eff.tflops, "tflops_dense": eff.tflops_dense,
        "tflops_paper": paper.total / 1e12, "tflops_paper_dense": paper.dense_total / 1e12,
        "kv_bytes": kv.total, "kv_bytes_dense": kv.dense_total,
    }
