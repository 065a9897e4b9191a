"""Multimodal projector: vision features [.., Cv] -> decoder embeddings [.., C]."""
from __future__ import annotations

from torch import nn

__all__ = ["build_projector"]


def build_projector(kind: str, vision_dim: int, hidden: int) -> nn.Module:
    if kind == "none":  # the tower ends in the decoder's width (Qwen2.5-VL's patch merger)
        return nn.Identity()
    if kind == "linear":
        return nn.Linear(vision_dim, hidden)
    if kind == "mlp2x_gelu":  # Linear, GELU (erf), Linear: keys 0.* and 2.* as in LLaVA checkpoints
        return nn.Sequential(nn.Linear(vision_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden))
    raise ValueError(f"unknown projector type {kind!r}; expected 'mlp2x_gelu' or 'linear'")
