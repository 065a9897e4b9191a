"""KV-cache bytes of a p-MoD model (and a training-free reduction) and its dense twin after a prefill (+ decode steps):
a pure function of config and token counts, under one of three stated conventions (`KVReport.ratio`)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pmod.config import PmodConfig
from pmod.reduction.spec import ReductionSpec
from pmod.token_counts import Counts, samples, tokens_per_layer

__all__ = ["KV_CONVENTIONS", "KVReport", "kv_cache_bytes"]

KV_CONVENTIONS = ("paper", "paper_int", "complete")


@dataclass(frozen=True)
class KVReport:
    """KV-cache bytes per layer (2·g·e·c_l·bytes, summed over the batch) for p-MoD and its dense twin.

    `ratio` follows `convention`: 'paper' = vision-token entries averaged over layers with fractional
    ratios, (L - |MoD| + Σ r_l) / L, text not counted (53.75 % at the default 32-layer schedule, the
    paper's 53.8 %); 'paper_int' = the same with integer k_l, Σ_l k_l / (L·n_vision) (53.69 % at 576
    tokens, the paper's v2 53.7 %); 'complete' = total bytes / dense bytes, text included."""

    convention: str
    per_layer: list[int]
    dense_per_layer: list[int]
    vision_fraction: float
    vision_fraction_int: float

    @property
    def total(self) -> int:
        return sum(self.per_layer)

    @property
    def dense_total(self) -> int:
        return sum(self.dense_per_layer)

    @property
    def ratio(self) -> float:
        return {"paper": self.vision_fraction, "paper_int": self.vision_fraction_int,
                "complete": self.total / self.dense_total}[self.convention]


def kv_cache_bytes(
    config: PmodConfig, n_vision: Counts, n_text: Counts, dtype: torch.dtype | int = torch.float16,
    convention: str = "paper", *, decode_steps: int = 0, batch: int = 1, reduction: ReductionSpec | None = None,
) -> KVReport:
    """KV cache held after prefill (+ decode steps): a dense layer keeps n + s entries, a MoD layer
    n_text + k_l + s. `dtype` is a torch dtype or bytes per element. With a `reduction` (see `count_flops`) the
    'paper' fraction is the integer one."""
    if convention not in KV_CONVENTIONS:
        raise ValueError(f"unknown KV convention {convention!r}; expected one of {KV_CONVENTIONS}")
    if decode_steps < 0:
        raise ValueError(f"decode_steps must be >= 0, got {decode_steps}")
    size = dtype if isinstance(dtype, int) else dtype.itemsize
    t, L, mod = config.text, config.text.num_hidden_layers, config.mod_ratios
    rows = samples(n_vision, n_text, batch)
    per_entry = 2 * t.num_key_value_heads * t.head_dim * size
    per, dense, kept = [0] * L, [0] * L, 0
    for v, n_t, _ in rows:
        toks = tokens_per_layer(config, v, n_t, reduction)
        per = [a + per_entry * (c + decode_steps) for a, c in zip(per, toks)]
        dense = [a + per_entry * (v + n_t + decode_steps) for a in dense]
        kept += sum(c - n_t for c in toks)
    vis = sum(v for v, _, _ in rows)
    frac = (L - len(mod) + sum(mod.values())) / L if vis and reduction is None else (kept / (L * vis) if vis else 1.0)
    return KVReport(convention, per, dense, frac, kept / (L * vis) if vis else 1.0)
