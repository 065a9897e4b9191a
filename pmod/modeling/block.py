"""A LLaMA-family decoder layer over packed tokens: RMSNorm, RoPE attention with GQA, SwiGLU MLP.

Parameter names follow transformers (`self_attn.q_proj`, `mlp.gate_proj`, `input_layernorm`, ...),
so checkpoint key maps stay thin. The layer exposes its two halves, `attend` (h + Attn(norm(h)))
and `feed_forward` (MLP(norm(h))), because a MoD layer scales only the MLP delta.
Legend: N tokens, C hidden, H/G query/kv heads, D head dim, F intermediate.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pmod.attention import AttentionBackend
from pmod.attention.extend import extend_attention
from pmod.cache import PmodCache
from pmod.config import TextConfig
from pmod.modeling.rope import apply_rope_tables
from pmod.packing import Varlen

__all__ = ["RMSNorm", "MLP", "Attention", "DecoderLayer", "AttnContext"]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32, scale in the input dtype (LLaMA's convention); one fused op in float32.
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        C, Fd, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = nn.Linear(C, Fd, bias=bias)
        self.up_proj = nn.Linear(C, Fd, bias=bias)
        self.down_proj = nn.Linear(Fd, C, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


@dataclass
class AttnContext:
    """How a layer's attention runs this call: the backend, the packed rows (prefill) or the cache (decode)."""

    backend: AttentionBackend
    varlen: Varlen | None = None  # prefill: the rows of the tokens this layer processes
    cache: PmodCache | None = None
    decode: bool = False
    extend: bool = False  # a chunk after the cached prefix: attend over the cache plus the new tokens (modeling/chunk.py)


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.H, self.G, self.D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        C = cfg.hidden_size
        self.q_proj = nn.Linear(C, self.H * self.D, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(C, self.G * self.D, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(C, self.G * self.D, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.H * self.D, C, bias=cfg.o_bias)
        if cfg.qk_norm:  # Qwen3: per-head RMSNorm of q and k before RoPE
            self.q_norm = RMSNorm(self.D, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.D, cfg.rms_norm_eps)
        self.scale = self.D**-0.5

    def queries(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """q [N, H, D] with RoPE, of the normed input x [N, C]; cos, sin: `rope_tables` [N, 1, 2, D/2]."""
        return self._rope(self.q_proj(x), self.H, getattr(self, "q_norm", None), cos, sin)

    def keys(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """k [N, G, D] with RoPE (what the cache stores), of the normed input x [N, C]."""
        return self._rope(self.k_proj(x), self.G, getattr(self, "k_norm", None), cos, sin)

    def _rope(self, y: torch.Tensor, heads: int, norm, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if norm is not None:  # Qwen3: per-head RMSNorm before RoPE
            return apply_rope_tables(norm(y.view(y.shape[0], heads, self.D)), cos, sin)
        # viewed as halves at once: one operator fewer per projection in every decode step
        return apply_rope_tables(y.view(y.shape[0], heads, 2, self.D // 2), cos, sin)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        N = x.shape[0]
        q, k = self.queries(x, cos, sin), self.keys(x, cos, sin)  # [N, H, D], [N, G, D]
        v = self.v_proj(x).view(N, self.G, self.D)  # [N, G, D]
        if ctx.decode:  # N = B rows, one new token each; the backend writes the cache (flash: inside its kernel)
            o = ctx.backend.decode_step(q, k, v, ctx.cache, self.layer_idx, self.scale)
        elif ctx.extend:  # N new tokens of B rows (ctx.varlen), after each row's cached slots
            k_cache, v_cache, past = ctx.cache.extend(self.layer_idx, k, v, ctx.varlen)
            o = extend_attention(ctx.backend.name, q, k_cache, v_cache, past, ctx.varlen, self.scale, ctx.cache.heads_first)
        else:
            if ctx.cache is not None:
                ctx.cache.store(self.layer_idx, k, v, ctx.varlen)
            o = ctx.backend.prefill(q, k, v, ctx.varlen, self.scale)
        return self.o_proj(o.reshape(N, self.H * self.D))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def attend(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        return h + self.self_attn(self.input_layernorm(h), cos, sin, ctx)

    def feed_forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.post_attention_layernorm(h))

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        h = self.attend(h, cos, sin, ctx)
        return h + self.feed_forward(h)
