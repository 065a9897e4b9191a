"""Optimizer memory of a strategy: the bytes its state holds now, and what 8-bit moments would take."""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch

__all__ = ["MOMENTS", "optimizer_state_bytes", "optimizer_state_bytes_8bit", "unwrap_optimizer"]


def unwrap_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's `AcceleratedOptimizer` (or the optimizer itself)."""
    return getattr(optimizer, "optimizer", optimizer)


def _state_tensors(optimizer: torch.optim.Optimizer) -> Iterable[tuple[str, torch.Tensor]]:
    for st in unwrap_optimizer(optimizer).state.values():
        for k, v in st.items():
            if torch.is_tensor(v):
                yield k, v


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes the optimizer holds in its per-parameter state right now (moments, projectors, quantisation scales)."""
    return sum(v.numel() * v.element_size() for _, v in _state_tensors(optimizer))


MOMENTS = ("exp_avg", "exp_avg_sq")


def optimizer_state_bytes_8bit(optimizer: torch.optim.Optimizer, block: int = 256, min_size: int = 4096) -> int:
    """What the same state would take with bitsandbytes-style 8-bit moments (analytic): each moment tensor of
    >= `min_size` elements as 1 byte per element plus one float32 absmax per `block` elements; smaller moments,
    projectors and step counters as they are."""
    total = 0
    for k, v in _state_tensors(optimizer):
        if k in MOMENTS and v.numel() >= min_size:
            total += v.numel() + 4 * math.ceil(v.numel() / block)
        else:
            total += v.numel() * v.element_size()
    return total
