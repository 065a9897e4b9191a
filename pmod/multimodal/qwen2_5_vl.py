"""Qwen2.5-VL's image pipeline: dynamic resolution (`smart_resize`), then patches grouped by merged token.

Read from transformers' Qwen2-VL image processor (PIL backend), which Qwen2.5-VL uses:
1. `smart_resize`: both sides rounded to multiples of factor = patch * merge (Python's `round`, half to even);
   above `max_pixels` they are scaled down (floor), below `min_pixels` up (ceil), aspect kept as closely as the
   multiples allow; aspect ratios above 200 are refused;
2. PIL bicubic resize to that size; rescale (uint8 * 1/255 in float64, then float32); normalise in float32;
3. cut p x p patches; group them m x m per merged token (row-major over the merged grid); repeat each patch
   `temporal_patch_size` times along time (a still image is a 2-frame clip of itself).
The result, per image, is [1, gh, gw, m*m, C*T*p*p] (gt = 1 for an image): flattened it is transformers'
`pixel_values` rows for that image, and its first three sides are the image's merged grid (`image_grid_thw`
is (1, gh*m, gw*m)). Each image then takes gh * gw tokens in the decoder.
Legend: H, W pixels; p patch; m merge; T temporal patch; gh, gw merged grid.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from pmod.multimodal.images import to_rgb

__all__ = ["smart_resize", "qwen_pixel_values", "qwen_num_tokens"]


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width) the image is resized to: multiples of `factor`, pixel count within [min_pixels, max_pixels]."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"image {width}x{height}: aspect ratio {max(height, width) / min(height, width):.1f} is over 200, "
                         f"which Qwen2.5-VL's processor refuses")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = max(factor, math.floor(height / beta / factor) * factor), max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def qwen_num_tokens(size_wh: tuple[int, int], patch: int, merge: int, min_pixels: int, max_pixels: int) -> int:
    """Decoder tokens of an image of `size_wh` (w, h), from its size alone."""
    h, w = smart_resize(size_wh[1], size_wh[0], patch * merge, min_pixels, max_pixels)
    return (h // (patch * merge)) * (w // (patch * merge))


def qwen_pixel_values(img: Image.Image, patch: int, merge: int, temporal: int, min_pixels: int, max_pixels: int,
                      mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """One image -> [1, gh, gw, m*m, 3*T*p*p] float32 (see the module docstring)."""
    img = to_rgb(img)
    h, w = smart_resize(img.size[1], img.size[0], patch * merge, min_pixels, max_pixels)
    img = img.resize((w, h), Image.Resampling.BICUBIC)  # same size: PIL returns a copy
    x = (np.asarray(img, dtype=np.uint8) * np.float64(1 / 255)).astype(np.float32)  # [H, W, 3]
    x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    gh, gw = h // (patch * merge), w // (patch * merge)
    x = x.transpose(2, 0, 1).reshape(3, gh, merge, patch, gw, merge, patch)  # [C, gh, m, p, gw, m, p]
    x = x.transpose(1, 4, 2, 5, 0, 3, 6)  # [gh, gw, m, m, C, p, p]
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], temporal, patch, patch))  # [gh, gw, m, m, C, T, p, p]
    x = np.ascontiguousarray(x).reshape(1, gh, gw, merge * merge, 3 * temporal * patch * patch)
    return torch.from_numpy(x)
