"""Attention of a chunk of new tokens over a cached prefix (continuing from a PmodCache).

Row b has `past[b]` cached slots of this layer and `n_b` new tokens, already written after them; new
token i may see slots 0 .. past[b] + i (causal, bottom-right aligned). Every backend reads the same
function: the eager backend gets the float32 reference (explicit scores), the others SDPA with a
[n_b, past[b] + n_b] mask, one call per row (host lengths: no device sync).
Legend: N new packed tokens, B rows, S cache slots, H/G query/kv heads, D head dim.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pmod.packing import Varlen

__all__ = ["extend_attention"]


def _causal_after(past: int, n: int, device) -> torch.Tensor:
    """[n, past + n] bool: new token i sees the prefix and new tokens 0..i."""
    return torch.arange(past + n, device=device)[None, :] <= (past + torch.arange(n, device=device))[:, None]


def _eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    # q [n, H, D], k/v [S, G, D], mask [n, S]; float32 scores as the eager backend computes them
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1).float(), v.repeat_interleave(rep, dim=1).float()
    scores = torch.einsum("qhd,shd->hqs", q.float(), k) * scale  # [H, n, S]
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("hqs,shd->qhd", scores.softmax(-1), v).to(q.dtype)


def extend_attention(
    backend_name: str,
    q: torch.Tensor,  # [N, H, D] the new tokens, packed by row (varlen)
    k_cache: torch.Tensor,  # [B, S, G, D], or [B, G, S, D] if heads_first; the new tokens already written
    v_cache: torch.Tensor,
    past: list[int],  # host, cached slots of each row before the chunk
    varlen: Varlen,
    scale: float,
    heads_first: bool,
) -> torch.Tensor:
    """-> [N, H, D]: each new token over its row's prefix and the new tokens up to itself."""
    out = torch.empty_like(q)
    start = 0
    for b, n in enumerate(varlen.lens):
        if n == 0:
            continue
        s, S = slice(start, start + n), past[b] + n
        mask = _causal_after(past[b], n, q.device)  # [n, S]
        if heads_first:
            k, v = k_cache[b, :, :S], v_cache[b, :, :S]  # [G, S, D]
        else:
            k, v = k_cache[b, :S].transpose(0, 1), v_cache[b, :S].transpose(0, 1)
        if backend_name == "eager":
            out[s] = _eager(q[s], k.transpose(0, 1), v.transpose(0, 1), mask, scale)
        else:
            o = F.scaled_dot_product_attention(q[s].transpose(0, 1)[None], k[None], v[None], attn_mask=mask,
                                               scale=scale, enable_gqa=q.shape[1] != k.shape[0])  # [1, H, n, D]
            out[s] = o[0].transpose(0, 1)
        start += n
    return out
