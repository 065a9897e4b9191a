"""How many feature tokens one image becomes in the decoder, from its pixel tensor's shape and its size alone.

One function for every layout, so that the model (laying out a batch before its tower runs) and the training data
(budgeting `model_max_length`) count alike: pad / square (P per image), LLaVA-NeXT anyres, LLaVA-OneVision
anyres_max (tiled or not, read off the crop count), Qwen2.5-VL native (the merged grid, read off the shape).
"""
from __future__ import annotations

import math

import torch

from pmod.config import PmodConfig

__all__ = ["image_token_count"]


def image_token_count(config: PmodConfig, pixels: torch.Tensor, size_wh: tuple[int, int] | None) -> int:
    """pixels: one image as the processor makes it ([3, S, S], [1+n, 3, S, S] or [gt, gh, gw, m*m, Dp])."""
    if config.image_aspect_ratio == "native":
        return math.prod(int(v) for v in pixels.shape[:3])
    v = config.vision
    if config.image_aspect_ratio != "anyres":
        return v.num_patches
    side = v.image_size // v.patch_size
    if config.anyres_max_crops is not None:
        from pmod.multimodal.anyres import grid_shape
        from pmod.multimodal.onevision import onevision_num_tokens

        gw, gh = grid_shape(size_wh, config.image_grid_pinpoints, v.image_size)
        if pixels.shape[0] not in (1, 1 + gw * gh):  # before the tower runs, not after
            raise ValueError(f"an image of {size_wh[0]}x{size_wh[1]} takes 1 + {gw}x{gh} crops (or 1, untiled), but its "
                             f"pixels hold {pixels.shape[0]}; pass the processor's output with its image_sizes")
        return onevision_num_tokens(size_wh, config.image_grid_pinpoints, v.image_size, side, config.anyres_max_crops,
                                    tiled=pixels.shape[0] > 1)
    from pmod.multimodal.anyres import anyres_num_tokens

    return anyres_num_tokens(size_wh, config.image_grid_pinpoints, v.image_size, side, config.mm_patch_merge_type)
