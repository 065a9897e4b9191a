"""Scores that rank each row's vision tokens for a drop: the last token's attention, a seeded random draw, a grid.

The attention score is computed for the one query row it needs: each row's last token's q against that row's keys
(the layer's own projections and RoPE, computed here from the layer input), softmax per head in float32, mean over
heads. No [N, N] attention matrix is formed and no attention backend is called, so the choice is the same under
eager, SDPA and flash attention. Legend: N packed tokens, B rows, M merged length, V vision slots per row,
H/G query/kv heads, D head dim.
"""
from __future__ import annotations

import numpy as np
import torch

from pmod.packing import Layout

__all__ = ["last_token_attention", "vision_attention_scores", "random_scores", "uniform_scores"]


def last_token_attention(layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: Layout) -> torch.Tensor:
    """[B, M] (float32, or float64 for float64 inputs): the attention each merged position gets from its row's last token in `layer` (a DecoderLayer,
    run on its input x [N, C] with RoPE tables cos, sin [N, 1, 2, D/2]), averaged over heads; 0 where no token is."""
    attn = layer.self_attn
    h = layer.input_layernorm(x)  # [N, C]
    last = (layout.varlen.cu_seqlens[1:] - 1).long()  # [B] packed index of each row's last token
    q = attn.queries(h.index_select(0, last), cos.index_select(0, last), sin.index_select(0, last))  # [B, H, D]
    k = layout.pad(attn.keys(h, cos, sin))  # [B, M, G, D], zero where padded
    B, M, G, D = k.shape
    acc = torch.promote_types(q.dtype, torch.float32)  # float32 at least (float64 stays: the tests' oracle)
    q = q.view(B, G, attn.H // G, D).to(acc)  # [B, G, H/G, D]: query heads grouped by their kv head
    logits = torch.einsum("bgrd,bmgd->bgrm", q, k.to(acc)) * attn.scale  # [B, G, H/G, M]
    logits = logits.masked_fill(~layout.merged_mask()[:, None, None, :], float("-inf"))
    return logits.softmax(-1).mean(dim=(1, 2))  # [B, M]


def vision_attention_scores(attention: torch.Tensor, layout: Layout) -> torch.Tensor:
    """[B, V] of a [B, M] score over merged positions, at each row's vision slots; -inf on padded slots."""
    N = layout.num_tokens
    pos = layout.out_index.index_select(0, layout.vision_slots.clamp(max=N - 1).flatten()) % layout.merged_len
    scores = attention.gather(1, pos.view(layout.vision_slots.shape))
    return scores.masked_fill(~layout.vision_valid, float("-inf"))


def random_scores(layout: Layout, seed: int) -> torch.Tensor:
    """[B, V]: a row's j-th vision token scores the j-th draw of a fresh Generator(seed) (host, numpy), so a row's
    choice depends on its own vision count only: batched equals one by one. -inf on padded slots."""
    V = layout.vision_slots.shape[1]
    draws = np.full((layout.batch_size, V), -np.inf)
    for b, n in enumerate(layout.n_vision):
        draws[b, :n] = np.random.default_rng(seed).random(n)
    return torch.from_numpy(draws).to(layout.position_ids.device, non_blocking=True)


def uniform_scores(layout: Layout, k: list[int]) -> torch.Tensor:
    """[B, V]: 1 on the k[b] evenly spaced vision tokens of row b (slot floor((j + 1/2) · n / k), j < k), 0 on the
    others, -inf on padded slots: the top k are exactly the grid."""
    V = layout.vision_slots.shape[1]
    grid = np.full((layout.batch_size, V), -np.inf)
    for b, (n, kb) in enumerate(zip(layout.n_vision, k)):
        grid[b, :n] = 0.0
        if kb:
            grid[b, ((np.arange(kb) + 0.5) * n / kb).astype(np.int64)] = 1.0
    return torch.from_numpy(grid).to(layout.position_ids.device, non_blocking=True)
