"""Next-token choice from logits: greedy, or sampling with temperature, top-k and top-p.

Pure tensor functions without host syncs (sampling by the exponential-race trick instead of
torch.multinomial). Legend: B rows, V vocab.
"""
from __future__ import annotations

import torch

__all__ = ["filter_logits", "sample_next"]


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """logits [B, V] -> scaled logits with everything outside top-k / the top-p nucleus at -inf."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}; use do_sample=False for greedy")
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest prefix reaching top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(
    logits: torch.Tensor,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """[B, V] -> [B] next tokens."""
    if not do_sample:
        return logits.argmax(-1)
    probs = filter_logits(logits.float(), temperature, top_k, top_p).softmax(-1)
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)  # argmax(p / E) ~ Categorical(p)
    return (probs / race).argmax(-1)
