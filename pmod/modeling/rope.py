"""Rotary position embeddings as pure functions of position ids (default, linear and llama3 scaling).

Positions are explicit per token, which is what p-MoD needs: kept tokens keep their original
positions, so RoPE sees the gaps left by skipped vision tokens. Legend: N tokens, D head dim.
"""
from __future__ import annotations

import math

import torch

from pmod.config import TextConfig

__all__ = ["rope_inv_freq", "rope_cos_sin", "apply_rope", "rope_tables", "tables_from_cos_sin", "apply_rope_tables"]


def rope_inv_freq(cfg: TextConfig, device: torch.device | str | None = None) -> torch.Tensor:
    """[D/2] float32 inverse frequencies, with the config's scaling applied."""
    D = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, D, 2, dtype=torch.int64, device=device).float() / D))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        inv = inv / scaling["factor"]
    elif kind == "llama3":
        factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_ctx = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        scaled = torch.where(wavelen > old_ctx / lo, inv / factor, inv)
        medium = (wavelen <= old_ctx / lo) & (wavelen >= old_ctx / hi)
        inv = torch.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
    return inv


def rope_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """position_ids [N] -> cos, sin [N, D] in `dtype` (computed in float32, as transformers does)."""
    freqs = position_ids.float()[:, None] * inv_freq[None, :].to(position_ids.device)  # [N, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [N, D]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, h, D]; cos, sin [N, D]. Rotates the two halves of each head (the LLaMA/HF layout)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def rope_tables(position_ids: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """position_ids [N] -> (cos, signed sin (-sin_lo, sin_hi)) [N, 1, 2, D/2] in `dtype`: `rope_cos_sin`'s values
    (float32 math, as transformers does), laid out so that `apply_rope_tables` is four operators
    (rotate_half(x) * sin == swap_halves(x) * signed sin exactly). Built once per forward / decode step."""
    f = position_ids.float()[:, None] * inv_freq  # [N, D/2]
    c, s = f.cos(), f.sin()
    cos, sin = torch.stack((c, c), 1), torch.stack((-s, s), 1)  # [N, 2, D/2]
    if dtype != torch.float32:
        cos, sin = cos.to(dtype), sin.to(dtype)
    return cos[:, None], sin[:, None]


def tables_from_cos_sin(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [N, D] (any RoPE variant, M-RoPE included) -> `rope_tables`' layout [N, 1, 2, D/2]: the same values."""
    N, D = cos.shape
    c, s = cos.view(N, 2, D // 2), sin.view(N, 2, D // 2)
    return c[:, None], torch.stack((-s[:, 0], s[:, 1]), 1)[:, None]


def apply_rope_tables(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """`apply_rope` over `rope_tables`: x [N, h, D] or [N, h, 2, D/2]; cos, sin_signed [N, 1, 2, D/2]. Returns [N, h, D]."""
    N, h = x.shape[:2]
    if x.dim() == 3:
        x = x.view(N, h, 2, -1)  # (x_lo, x_hi) on dim 2
    return torch.addcmul(x * cos, x.flip(2), sin_signed).view(N, h, -1)  # x * cos + swapped * sin, one op fewer
