"""Router math for p-MoD: weight normalisation and per-sample top-k selection of vision tokens.

Pure tensor functions, no host syncs. Legend: B rows, V vision-token slots per row (padded to the
longest row), K = max kept count over rows.
"""
from __future__ import annotations

import torch

__all__ = ["ELEMENTWISE_NORMS", "elementwise_norm", "normalize_router_logits", "select_top_k"]

# Router weight normalisations that act token by token (softmax over a row's vision tokens does not).
ELEMENTWISE_NORMS = ("tanh", "sigmoid", "none")


def elementwise_norm(r: torch.Tensor, kind: str = "tanh", scale: float = 0.2, bias: float = 1.0) -> torch.Tensor:
    """w = scale * f(r) + bias for f in ELEMENTWISE_NORMS (token by token; any shape)."""
    if kind == "tanh":
        f = torch.tanh(r)
    elif kind == "sigmoid":
        f = torch.sigmoid(r)
    elif kind == "none":
        f = r
    else:
        raise ValueError(f"router norm {kind!r} is not elementwise; expected one of {ELEMENTWISE_NORMS}")
    return f * scale + bias


def normalize_router_logits(
    r: torch.Tensor, valid: torch.Tensor, kind: str = "tanh", scale: float = 0.2, bias: float = 1.0
) -> torch.Tensor:
    """w = scale * f(r) + bias, f in {tanh (TanhNorm), sigmoid, softmax over the row's vision tokens, none}.

    r, valid: [B, V]; invalid slots (padding of shorter rows) get w = 0 and never influence softmax.
    """
    if kind in ELEMENTWISE_NORMS:
        return elementwise_norm(r, kind, scale, bias).masked_fill(~valid, 0.0)
    if kind != "softmax":
        raise ValueError(f"unknown router norm {kind!r}; expected tanh, sigmoid, softmax or none")
    f = torch.softmax(r.masked_fill(~valid, float("-inf")), dim=-1).nan_to_num(0.0)
    return (f * scale + bias).masked_fill(~valid, 0.0)


def select_top_k(w: torch.Tensor, valid: torch.Tensor, k: torch.Tensor, k_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the slots of the k[b] largest weights among its valid slots.

    w, valid: [B, V]; k: [B] (device, long) with k <= valid count; k_max: max(k) known on the host.
    Returns (slots [B, K] in descending weight order, chosen [B, K] bool: slot j < k[b]).
    Ties are broken by torch.topk, as in the official code.
    """
    scores = w.detach().masked_fill(~valid, float("-inf"))  # [B, V]; selection carries no gradient
    slots = scores.topk(k_max, dim=-1, sorted=True).indices  # [B, K]
    chosen = torch.arange(k_max, device=w.device) < k[:, None]  # [B, K]
    return slots, chosen
