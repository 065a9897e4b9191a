"""Reference attention: explicit scores, mask and softmax in float32. Slow; the oracle for tests."""
from __future__ import annotations

import torch

from pmod.packing import Varlen

__all__ = ["prefill", "decode"]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    # q [Q, H, D], k/v [S, G, D], mask [Q, S] (True = attend)
    rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(rep, dim=1).float()
    v = v.repeat_interleave(rep, dim=1).float()
    scores = torch.einsum("qhd,shd->hqs", q.float(), k) * scale  # [H, Q, S]
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("hqs,shd->qhd", scores.softmax(-1), v).to(q.dtype)


def prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, varlen: Varlen, scale: float) -> torch.Tensor:
    out, start = [], 0
    for n in varlen.lens:
        s = slice(start, start + n)
        causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        out.append(_attend(q[s], k[s], v[s], causal, scale))
        start += n
    return torch.cat(out)


def decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seqlens: torch.Tensor, scale: float,
           uniform: bool = False) -> torch.Tensor:
    """q [B, H, D]; k/v_cache [B, S, G, D]; the mask is always built (this is the oracle)."""
    S = k_cache.shape[1]
    valid = torch.arange(S, device=q.device)[None, :] < seqlens[:, None]  # [B, S]
    return torch.stack([_attend(q[b, None], k_cache[b], v_cache[b], valid[b, None], scale)[0] for b in range(q.shape[0])])
