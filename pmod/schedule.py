"""Progressive ratio decay (PRD): which decoder layers route vision tokens, and at what ratio.

Pure functions of the layer count and the schedule's numbers. The official code hard-codes the
denominator 31 for its 32-layer LLMs; we use L-1, which reproduces it exactly at L = 32 and
stretches the same curve over any depth.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["SCHEDULES", "decay_curve", "prd_schedule", "kept_count"]

SCHEDULES = ("shiftedcos", "shiftedlinear", "deep_all", "deep_all_include_last", "interleave", "none")


def decay_curve(kind: str, num_layers: int, avg_ratio: float) -> list[float]:
    """Raw (unclipped) keep ratio of every layer for a decaying schedule."""
    span = max(num_layers - 1, 1)
    if kind == "shiftedcos":
        return [math.cos(i * math.pi / span) / 2 + avg_ratio for i in range(num_layers)]
    if kind == "shiftedlinear":
        return [(-i / span + 0.5) + avg_ratio for i in range(num_layers)]
    raise ValueError(f"decay_curve: unknown decay kind {kind!r}; expected 'shiftedcos' or 'shiftedlinear'")


def prd_schedule(
    num_layers: int,
    kind: str = "shiftedcos",
    avg_ratio: float = 0.5,
    max_ratio: float = 0.85,
    min_ratio: float = 0.15,
) -> dict[int, float]:
    """Map MoD layer index -> keep ratio.

    Decaying kinds: layer i routes iff its curve value is <= max_ratio (shallower layers stay dense)
    and keeps max(curve(i), min_ratio) of its vision tokens. Constant kinds (`deep_all`, ...) route
    their layers at `avg_ratio`. `none` is a dense model.
    """
    if num_layers < 1:
        raise ValueError(f"prd_schedule: num_layers must be >= 1, got {num_layers}")
    if kind not in SCHEDULES:
        raise ValueError(f"prd_schedule: unknown schedule {kind!r}; expected one of {SCHEDULES}")
    if kind == "none":
        return {}
    if kind in ("shiftedcos", "shiftedlinear"):
        if not 0.0 < min_ratio <= max_ratio <= 1.0:
            raise ValueError(
                f"prd_schedule: need 0 < min_ratio <= max_ratio <= 1, got min_ratio={min_ratio}, max_ratio={max_ratio}"
            )
        curve = decay_curve(kind, num_layers, avg_ratio)
        return {i: max(r, min_ratio) for i, r in enumerate(curve) if r <= max_ratio}
    if not 0.0 < avg_ratio <= 1.0:
        raise ValueError(f"prd_schedule: a constant schedule needs 0 < avg_ratio <= 1, got {avg_ratio}")
    layers = {
        "deep_all": range(2, num_layers - 1),
        "deep_all_include_last": range(2, num_layers),
        "interleave": range(1, num_layers, 2),
    }[kind]
    return {i: float(avg_ratio) for i in layers}


def kept_count(n_vision: int, ratio: float) -> int:
    """k = trunc(n_vision * ratio) in float32, bit-for-bit the official int32-tensor-times-float product."""
    return int(np.float32(n_vision) * np.float32(ratio))
