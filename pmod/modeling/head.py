"""The output head: logits of the final hidden states (all, last, none, or chosen positions) and the loss.

Full logits are the largest tensor a forward makes ([B, M, V] float32). They are written straight into
the padded result: one GEMM per row into that row's slice of the output (one GEMM in all when no row is
padded), only the padding slots zeroed, so the cost is the GEMM's, not GEMM + padding copy + dtype pass.
Positions (`logits_to_keep` an int or per-row indices) gather the hidden rows first, then run one GEMM.
Legend: B rows, M merged length, N packed tokens, P kept positions per row, C hidden, V vocab.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pmod.packing import IGNORE_INDEX, Layout

__all__ = ["keep_positions", "logits_all", "logits_at", "logits_last", "next_token_loss", "output_logits"]

Keep = str | int | Sequence | torch.Tensor


def output_logits(lm_head: nn.Module, h: torch.Tensor, layout: Layout, keep: Keep) -> torch.Tensor | None:
    """Logits (float32) of h [N, C] packed as `layout`: keep="all" [B, M, V] (0 at padding), "last" [B, V], "none"
    None, an int k [B, k, V] (each row's last k tokens; 0 where a row is shorter, so with left padding this is
    `all[:, -k:]`; k=0 means all, as in transformers), or merged positions: 1-D (the same for every row) or one
    sequence per row (ragged allowed: rows padded with 0 at the end) -> [B, P, V], equal to `all[b, pos[b]]`."""
    if isinstance(keep, str):
        if keep == "all":
            return logits_all(lm_head, h, layout)
        if keep == "last":
            return logits_last(lm_head, h, layout)
        if keep == "none":
            return None
        raise ValueError(f"logits_to_keep={keep!r}; expected 'all', 'last', 'none', an int or positions")
    if isinstance(keep, int) and not isinstance(keep, bool) and keep == 0:
        return logits_all(lm_head, h, layout)
    pos, valid = keep_positions(keep, layout)
    return logits_at(lm_head, h, layout, pos, valid)


def _plain_weight(lm_head: nn.Module, h: torch.Tensor) -> torch.Tensor | None:
    """The weight [V, C] when `lm_head` is a bias-free nn.Linear used without autograd (the `out=` GEMM path);
    None for anything else (an adapter, a bias, a backward to build), which runs the module itself."""
    if type(lm_head) is not nn.Linear or lm_head.bias is not None:
        return None
    if torch.is_grad_enabled() and (h.requires_grad or lm_head.weight.requires_grad):
        return None
    return lm_head.weight


def _row_starts(layout: Layout) -> list[int]:
    """Host: each row's first slot in the flat [B * M] merged output (`packing.build_layout`'s out_index)."""
    M = layout.merged_len
    return [b * M + (M - n if layout.left_padded else 0) for b, n in enumerate(layout.varlen.lens)]


def logits_all(lm_head: nn.Module, h: torch.Tensor, layout: Layout) -> torch.Tensor:
    """[B, M, V] float32 logits of every merged position, 0 at padding."""
    B, M = layout.batch_size, layout.merged_len
    w = _plain_weight(lm_head, h)
    if w is None:  # the reference path: GEMM, cast, padding copy
        return layout.pad(lm_head(h).float())
    N, V = h.shape[0], w.shape[0]
    out = h.new_empty((B * M, V))  # [B*M, V] in the GEMM's dtype
    if N == B * M:  # no padding: packed order is merged order
        torch.mm(h, w.t(), out=out)
    else:
        lo = 0
        for b, (n, s) in enumerate(zip(layout.varlen.lens, _row_starts(layout))):
            if n:
                torch.mm(h[lo : lo + n], w.t(), out=out[s : s + n])  # a contiguous row slice: no copy
            out[b * M : s].zero_()
            out[s + n : (b + 1) * M].zero_()
            lo += n
    out = out.view(B, M, V)
    return out if out.dtype == torch.float32 else out.float()  # half models: the one cast the float32 result needs


def logits_last(lm_head: nn.Module, h: torch.Tensor, layout: Layout) -> torch.Tensor:
    """[B, V] float32 logits of each row's last token."""
    last = (layout.varlen.cu_seqlens[1:] - 1).long().to(h.device)  # [B]
    return lm_head(h.index_select(0, last)).float()


def keep_positions(keep, layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """`logits_to_keep` as packed indices [B, P] long (into h) and a validity mask [B, P] bool (False: padding).
    Positions index the merged sequence [0, M) as `logits_to_keep='all'` does; negative ones count from M."""
    B, M, lens = layout.batch_size, layout.merged_len, layout.varlen.lens
    if isinstance(keep, bool) or (isinstance(keep, int) and keep < 0):
        raise ValueError(f"logits_to_keep={keep!r}; an int must be >= 0 (the last k tokens of each row; 0: all)")
    if isinstance(keep, int):  # each row's last k tokens, right-aligned
        rows = [[s + n - keep + j for j in range(keep)] for s, n in zip(_starts_in_row(layout), lens)]
        return _packed(rows, [[r >= s for r in row] for row, s in zip(rows, _starts_in_row(layout))], layout)
    rows = _position_rows(keep, B)
    bad = [p for row in rows for p in row if not -M <= p < M]
    if bad:
        raise ValueError(f"logits_to_keep positions {bad[:5]} outside the merged sequence of length {M}")
    rows = [[p % M for p in row] for row in rows]
    valid = [[s <= p < s + n for p in row] for row, s, n in zip(rows, _starts_in_row(layout), lens)]
    return _packed(rows, valid, layout)


def _starts_in_row(layout: Layout) -> list[int]:
    M = layout.merged_len
    return [M - n if layout.left_padded else 0 for n in layout.varlen.lens]


def _position_rows(keep, B: int) -> list[list[int]]:
    """Positions as one list per row: 1-D (shared) or 2-D / a list of per-row sequences."""
    if torch.is_tensor(keep):
        if keep.dtype.is_floating_point or keep.dtype == torch.bool or keep.dim() not in (1, 2):
            raise ValueError(f"logits_to_keep as a tensor must be integer positions, 1-D or [B, P]; got "
                             f"{keep.dtype} {tuple(keep.shape)}")
        keep = keep.tolist()
    if not isinstance(keep, Sequence) or not len(keep):
        raise ValueError(f"logits_to_keep={keep!r}; expected 'all', 'last', 'none', an int or a non-empty sequence of positions")
    nested = [isinstance(p, (Sequence, torch.Tensor)) and not isinstance(p, str) for p in keep]
    if any(nested) != all(nested):
        raise ValueError("logits_to_keep mixes positions and per-row sequences; give one or the other")
    rows = [list(map(int, r.tolist() if torch.is_tensor(r) else r)) for r in keep] if all(nested) else [list(map(int, keep))] * B
    if len(rows) != B:
        raise ValueError(f"logits_to_keep has positions for {len(rows)} rows; the batch has {B}")
    return rows


def _packed(rows: list[list[int]], valid: list[list[bool]], layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """Merged positions per row (host) -> packed indices [B, P] (0 where invalid) and the mask, P = longest row."""
    P, cu = max(map(len, rows)), [0]
    for n in layout.varlen.lens:
        cu.append(cu[-1] + n)
    idx = [[cu[b] + p - s if ok else 0 for p, ok in zip(row, v)] + [0] * (P - len(row))
           for b, (row, v, s) in enumerate(zip(rows, valid, _starts_in_row(layout)))]
    mask = [list(v) + [False] * (P - len(v)) for v in valid]
    dev = layout.position_ids.device
    return torch.tensor(idx, dtype=torch.long).to(dev), torch.tensor(mask, dtype=torch.bool).to(dev)


def logits_at(lm_head: nn.Module, h: torch.Tensor, layout: Layout, idx: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[B, P, V] float32 logits of the packed rows idx [B, P]; 0 where not `valid` (padding)."""
    B, P = idx.shape
    sel = h.index_select(0, idx.flatten().to(h.device))  # [B*P, C]
    keep = valid.flatten().to(h.device)
    w = _plain_weight(lm_head, h)
    if w is None:
        return lm_head(sel).float().masked_fill(~keep[:, None], 0.0).view(B, P, -1)
    sel = sel * keep[:, None].to(sel.dtype)  # zero hidden -> exactly zero logits (no bias): no pass over [B*P, V]
    out = torch.mm(sel, w.t())
    return (out if out.dtype == torch.float32 else out.float()).view(B, P, -1)


def next_token_loss(lm_head: nn.Module, h: torch.Tensor, labels: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Mean next-token cross-entropy over supervised merged positions, pooled over the batch."""
    N = layout.num_tokens
    lab = torch.full((N,), IGNORE_INDEX, dtype=torch.long, device=h.device)
    lab = lab.index_copy(0, layout.text_dest.to(h.device), labels.to(h.device).flatten().index_select(0, layout.text_src.to(h.device)))
    target = torch.cat([lab[1:], lab.new_full((1,), IGNORE_INDEX)])  # next token's label
    target[(layout.varlen.cu_seqlens[1:] - 1).long().to(h.device)] = IGNORE_INDEX  # no next token across rows
    logits = lm_head(h).float()  # [N, V]
    return F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX)
