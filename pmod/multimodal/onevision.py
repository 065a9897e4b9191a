"""LLaVA-OneVision's `anyres_max_N` image layout: LLaVA-NeXT's anyres, unpadded, then shrunk to at most ~N crops.

What differs from LLaVA-NeXT (`pmod.multimodal.anyres`), read from transformers' `llava_onevision`:
- unpadding keeps `int(round(side * scale, 7))` rows/columns (NeXT: `int(side * scale)`), then cuts
  `(cur - new) // 2` from both ends;
- when the unpadded map [C, h, w] holds more than 1.1² · N crops' worth of tokens (ratio = sqrt(h·w / (N·s²))
  > 1.1), it is bilinearly resized to [int(h // ratio), int(w // ratio)] (align_corners=False);
- `image_newline` after every row, as NeXT; the base image's tokens come first;
- an image given as a single crop [1, 3, S, S] (the processor's choice for samples with several images: padded
  to a square on the mean colour, no tiling) gives its P tokens and one `image_newline`.
The token count must be known before the tower runs, so `onevision_num_tokens` repeats the same integer
arithmetic as `assemble_onevision_features`; a test holds the two equal.

Legend: S crop side in pixels, s = patch_side (tokens per crop side), P = s*s, C channels, N assembled tokens.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from pmod.multimodal.anyres import anyres_pixel_values, grid_shape
from pmod.multimodal.images import pad_pixel_values

__all__ = ["onevision_unpad_bounds", "onevision_map_shape", "onevision_num_tokens", "assemble_onevision_features",
           "onevision_pixel_values", "parse_anyres_max"]

Size = tuple[int, int]


def parse_anyres_max(s: str) -> int:
    """transformers' `vision_aspect_ratio` string 'anyres_max_9' -> 9 (the only place it is parsed)."""
    head, _, num = str(s).rpartition("_")
    if head != "anyres_max" or not num.isdigit() or int(num) < 1:
        raise ValueError(f"vision_aspect_ratio={s!r}: expected 'anyres_max_N' with N >= 1, such as 'anyres_max_9'")
    return int(num)


def onevision_unpad_bounds(current_hw: Size, original_wh: Size) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the [.., H, W] map that drops the resize-and-pad border, rounded as OneVision."""
    ch, cw = current_hw
    ow, oh = original_wh
    if ow / oh > cw / ch:  # wider than the map: bands were added top and bottom
        new_h = int(round(oh * (cw / ow), 7))
        pad = (ch - new_h) // 2
        return pad, ch - pad, 0, cw
    new_w = int(round(ow * (ch / oh), 7))
    pad = (cw - new_w) // 2
    return 0, ch, pad, cw - pad


def _shrink(h: int, w: int, patch_side: int, max_crops: int) -> Size:
    """(h, w) after the anyres_max down-sampling (unchanged when the map is small enough)."""
    ratio = math.sqrt(h * w / (max_crops * patch_side**2))
    return (int(h // ratio), int(w // ratio)) if ratio > 1.1 else (h, w)


def onevision_map_shape(image_size_wh: Size, pinpoints: Sequence[Sequence[int]], image_size: int, patch_side: int,
                        max_crops: int) -> Size:
    """(h, w) of the high-resolution token map of one tiled image, after unpadding and down-sampling."""
    gw, gh = grid_shape(image_size_wh, pinpoints, image_size)
    top, bottom, left, right = onevision_unpad_bounds((gh * patch_side, gw * patch_side), image_size_wh)
    return _shrink(bottom - top, right - left, patch_side, max_crops)


def onevision_num_tokens(image_size_wh: Size, pinpoints: Sequence[Sequence[int]], image_size: int, patch_side: int,
                         max_crops: int, tiled: bool = True) -> int:
    """Tokens `assemble_onevision_features` returns, from the image size alone. `tiled=False`: one crop + newline."""
    P = patch_side * patch_side
    if not tiled:
        return P + 1
    h, w = onevision_map_shape(image_size_wh, pinpoints, image_size, patch_side, max_crops)
    return P + h * (w + 1)


def assemble_onevision_features(
    feats: torch.Tensor,
    image_size_wh: Size,
    pinpoints: Sequence[Sequence[int]],
    image_size: int,
    patch_side: int,
    image_newline: torch.Tensor,
    max_crops: int,
) -> torch.Tensor:
    """One image's projected crop features [1 + n, P, C] (base first, crops row-major) -> tokens [N, C]."""
    n1, p, c = feats.shape
    s = patch_side
    if p != s * s:
        raise ValueError(f"assemble_onevision_features: {p} tokens per crop, expected {s * s}")
    newline = image_newline.to(feats.dtype)
    if n1 == 1:  # untiled (several images in one sample)
        return torch.cat([feats[0], newline[None]])  # [P + 1, C]
    gw, gh = grid_shape(image_size_wh, pinpoints, image_size)
    if n1 != 1 + gw * gh:
        raise ValueError(f"assemble_onevision_features: feats {tuple(feats.shape)} but image {tuple(image_size_wh)} gives "
                         f"a {gw}x{gh} grid, so expected [{1 + gw * gh}, {s * s}, C] (or [1, {s * s}, C] untiled)")
    fmap = feats[1:].view(gh, gw, s, s, c).permute(4, 0, 2, 1, 3).reshape(c, gh * s, gw * s)  # [C, gh*s, gw*s]
    top, bottom, left, right = onevision_unpad_bounds((gh * s, gw * s), image_size_wh)
    fmap = fmap[:, top:bottom, left:right]  # [C, h, w]
    h, w = _shrink(fmap.shape[1], fmap.shape[2], s, max_crops)
    if (h, w) != tuple(fmap.shape[1:]):
        fmap = F.interpolate(fmap[None], [h, w], mode="bilinear")[0]  # [C, h', w']
    rows = torch.cat([fmap, newline.view(c, 1, 1).expand(c, h, 1)], dim=2)  # [C, h', w'+1]
    return torch.cat([feats[0], rows.permute(1, 2, 0).reshape(-1, c)])  # [N, C]


def onevision_pixel_values(img: Image.Image, pinpoints: Sequence[Sequence[int]], image_size: int, mean: Sequence[float],
                           std: Sequence[float], tiled: bool = True) -> torch.Tensor:
    """[1 + n, 3, S, S] tiled (the base image squashed to S x S, then the crops; NeXT's pipeline), or [1, 3, S, S]
    untiled: padded to a square on the mean colour, then resized (what OneVision does for multi-image samples)."""
    if tiled:
        return anyres_pixel_values(img, pinpoints, image_size, mean, std)
    return pad_pixel_values(img, image_size, mean, std)[None]
