"""Learning-rate schedules with linear warm-up, as pure functions of the step.

The formulas are transformers' (`get_cosine_schedule_with_warmup` and friends, which LLaVA's Trainer
runs), so the official recipe's curve is reproduced step for step; a test checks them against
transformers. `WarmupSchedule` is a picklable callable so that `LambdaLR.state_dict()` round-trips.
"""
from __future__ import annotations

import math

import torch

__all__ = ["lr_factor", "warmup_steps_for", "WarmupSchedule", "build_scheduler"]


def lr_factor(kind: str, step: int, warmup: int, total: int) -> float:
    """Multiplier of the base lr at `step` (0-based count of optimizer steps taken)."""
    if step < warmup:
        return step / max(1, warmup)
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return max(0.0, (total - step) / max(1, total - warmup))
    if kind == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    raise ValueError(f"unknown lr schedule {kind!r}; expected cosine, linear or constant")


def warmup_steps_for(total: int, ratio: float, steps: int | None = None) -> int:
    """transformers' rule: ceil(total x ratio) unless an explicit count is given."""
    return int(steps) if steps is not None else math.ceil(total * ratio)


class WarmupSchedule:
    def __init__(self, kind: str, warmup: int, total: int):
        lr_factor(kind, 0, warmup, total)  # validates the kind
        self.kind, self.warmup, self.total = kind, warmup, total

    def __call__(self, step: int) -> float:
        return lr_factor(self.kind, step, self.warmup, self.total)


def build_scheduler(optimizer: torch.optim.Optimizer, kind: str, total: int, warmup_ratio: float,
                    warmup_steps: int | None = None) -> torch.optim.lr_scheduler.LambdaLR:
    warm = warmup_steps_for(total, warmup_ratio, warmup_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupSchedule(kind, warm, total))
