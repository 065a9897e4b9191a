"""Multimodal RoPE (Qwen2-VL / Qwen2.5-VL) as pure functions: 3-D positions and their cos / sin.

Every token has a (t, h, w) position. Text: all three equal, counting on from the previous token. An image whose
merged token grid is (gt, gh, gw), starting at position s, gives its tokens (raster order over t, h, w)
(s + i, s + j, s + k); the text after it continues at s + max(gh, gw) (for a still image, gt = 1). This is
transformers' `Qwen2_5_VLModel.get_rope_index` for images. The rotary pairs are split into
`mrope_section` = (n_t, n_h, n_w) consecutive groups, driven by t, h and w respectively.

p-MoD keeps each kept token's 3-D position (cos / sin rows are gathered by token, as for 1-D RoPE). Decode
tokens are text, so their three positions are equal and plain RoPE gives the same cos / sin: a row's decode
position starts at 1 + the largest position of its prompt (transformers' `rope_deltas`).
Legend: B rows, T input length, N packed tokens, D head dim.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["mrope_positions", "mrope_cos_sin", "image_positions", "attach_mrope"]

IMAGE_TOKEN_INDEX = -200  # pmod.packing's; repeated to keep this module free of imports


def image_positions(start: int, grid: tuple[int, int, int]) -> np.ndarray:
    """[3, gt*gh*gw] positions of one image's merged tokens, raster order, offset by `start`."""
    gt, gh, gw = grid
    t, h, w = np.meshgrid(np.arange(gt), np.arange(gh), np.arange(gw), indexing="ij")
    return np.stack([t, h, w]).reshape(3, -1) + start


def mrope_positions(ids: np.ndarray, mask: np.ndarray, grids: list[tuple[int, int, int]]) -> tuple[np.ndarray, list[int]]:
    """Positions of every real token of a batch in packed order (rows end to end, padding dropped, each
    IMAGE_TOKEN_INDEX expanded to its image's gt*gh*gw tokens), and each row's first decode position.

    ids, mask: [B, T] host arrays; grids: the merged (gt, gh, gw) of each image, in placeholder order.
    Returns (pos [3, N] int64, next_pos [B])."""
    it = iter(grids)
    rows, nxt = [], []
    for b in range(ids.shape[0]):
        row = ids[b][mask[b].astype(bool)]
        pieces, cur, i = [], 0, 0
        for j in [*np.flatnonzero(row == IMAGE_TOKEN_INDEX).tolist(), len(row)]:
            if j > i:  # text run row[i:j]
                pieces.append(np.broadcast_to(np.arange(cur, cur + j - i), (3, j - i)))
                cur += j - i
            if j < len(row):
                grid = next(it)
                pieces.append(image_positions(cur, grid))
                cur += max(grid[1], grid[2])
            i = j + 1
        pos = np.concatenate(pieces, axis=1) if pieces else np.zeros((3, 0), np.int64)
        rows.append(pos)
        nxt.append(int(pos.max()) + 1 if pos.size else 0)
    return np.concatenate(rows, axis=1).astype(np.int64), nxt


def mrope_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor, section: list[int], dtype: torch.dtype,
                  interleaved: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """position_ids [3, N] -> cos, sin [N, D] in `dtype` (float32 arithmetic, as transformers).
    Blocks (Qwen2-VL): pairs [0, s_t) follow t, the next s_h follow h, the last s_w follow w. Interleaved
    (Qwen3-VL): pair j follows h if j % 3 == 1 and j < 3 s_h, w if j % 3 == 2 and j < 3 s_w, else t."""
    freqs = position_ids.float()[..., None] * inv_freq.to(position_ids.device)  # [3, N, D/2]
    if interleaved:
        f = freqs[0].clone()  # [N, D/2]
        for axis in (1, 2):
            f[..., axis : 3 * section[axis] : 3] = freqs[axis][..., axis : 3 * section[axis] : 3]
        freqs = f
    else:
        freqs = torch.cat([part[i % 3] for i, part in enumerate(freqs.split(section, dim=-1))], dim=-1)  # [N, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [N, D]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def attach_mrope(layout, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, images) -> None:
    """Set `layout.rope_positions` [3, N] (on the layout's device) and `layout.next_positions` for a batch whose
    images are Qwen2.5-VL pixel tensors [gt, gh, gw, m*m, Dp] (their first three sides are the merged grid)."""
    ids = input_ids.detach().cpu().numpy()
    mask = np.ones_like(ids, dtype=bool) if attention_mask is None else attention_mask.detach().cpu().numpy().astype(bool)
    items = [] if images is None else ([images] if torch.is_tensor(images) else list(images))
    pos, nxt = mrope_positions(ids, mask, [tuple(int(v) for v in x.shape[:3]) for x in items])
    if pos.shape[1] != layout.num_tokens:
        raise RuntimeError(f"M-RoPE positions cover {pos.shape[1]} tokens, the layout {layout.num_tokens}")
    layout.rope_positions = torch.from_numpy(pos).to(layout.position_ids.device, non_blocking=True)
    layout.next_positions = nxt
