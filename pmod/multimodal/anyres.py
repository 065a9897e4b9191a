"""LLaVA-NeXT "anyres": pick a grid, cut crops, and lay the crops' features back out.

Pixel side: the image is resize-and-padded (on black) into the best pinpoint resolution, cut into
S x S crops row-major, and preceded by the whole image squashed to S x S (no padding, no aspect
kept). Feature side (`spatial_unpad`): base-image tokens, then the crops' token grids stitched into
one map [C, gh*s, gw*s], the black padding cut away again, a learned `image_newline` after every
row, flattened row-major.

The host needs the token count before the vision tower runs (to lay out packed sequences), so
`anyres_num_tokens` derives it from the image size alone, with the same integer arithmetic as
`assemble_anyres_features`; a test holds the two equal.

Integer quirks kept from the official code (they decide token counts, so they are the contract):
- `select_best_resolution` truncates the downscaled size with `int()`; ties keep the first pinpoint.
- `resize_and_pad` rounds the scaled side UP (`math.ceil`), capped at the target.
- `unpad` truncates the kept side with `int()` but cuts `(cur - new) // 2` from BOTH ends, so an odd
  surplus keeps one row/column more than `new`.

Legend: S crop side in pixels, s = patch_side (tokens per crop side), P = s*s tokens per crop,
n = gw*gh crops, C channels, N assembled tokens.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from PIL import Image

from pmod.multimodal.images import CLIP_MEAN, CLIP_STD, clip_preprocess

__all__ = [
    "MERGE_TYPES",
    "NEXT_GRIDS",
    "pinpoints_from_grids",
    "select_best_resolution",
    "grid_shape",
    "resize_and_pad",
    "divide_to_patches",
    "anyres_pixel_values",
    "unpad_shape",
    "unpad_image",
    "assemble_anyres_features",
    "anyres_num_tokens",
]

MERGE_TYPES = ("flat", "spatial", "spatial_unpad")
# Grids (w, h) in crops of the p-MoD LLaVA-NeXT recipe (train.py, 'next' data), by max_num_sub_images.
NEXT_GRIDS: dict[int, tuple[tuple[int, int], ...]] = {
    4: ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3)),
    9: ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3), (3, 2), (2, 3), (3, 3), (2, 4), (4, 2)),
}

Size = tuple[int, int]


def pinpoints_from_grids(grids: Sequence[Sequence[int]], image_size: int) -> list[list[int]]:
    """Pinpoint resolutions [[w, h], ...] from crop grids [[gw, gh], ...] times the crop side S."""
    return [[int(g[0]) * image_size, int(g[1]) * image_size] for g in grids]


def select_best_resolution(image_size_wh: Size, pinpoints: Sequence[Sequence[int]]) -> Size:
    """The pinpoint (w, h) keeping the most image pixels, then wasting the fewest.

    The effective resolution is the fitted size (truncated) capped at the original pixel count,
    so upscaling earns nothing; among equals the first pinpoint in the list wins.
    """
    ow, oh = image_size_wh
    best: Size | None = None
    best_eff, best_waste = 0, math.inf
    for w, h in pinpoints:
        scale = min(w / ow, h / oh)
        eff = min(int(ow * scale) * int(oh * scale), ow * oh)
        waste = w * h - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (int(w), int(h)), eff, waste
    if best is None:
        raise ValueError(f"select_best_resolution: no usable pinpoint in {list(pinpoints)} for image {image_size_wh}")
    return best


def grid_shape(image_size_wh: Size, pinpoints: Sequence[Sequence[int]], image_size: int) -> Size:
    """(grid_w, grid_h): crops across and down for the chosen pinpoint."""
    w, h = select_best_resolution(image_size_wh, pinpoints)
    return w // image_size, h // image_size


def _fit_size(image_size_wh: Size, target_wh: Size) -> Size:
    """Aspect-keeping size inside target_wh: the tight side exact, the other ceil'ed and capped."""
    ow, oh = image_size_wh
    tw, th = target_wh
    sw, sh = tw / ow, th / oh
    if sw < sh:
        return tw, min(math.ceil(oh * sw), th)
    return min(math.ceil(ow * sh), tw), th


def resize_and_pad(img: Image.Image, target_wh: Size) -> Image.Image:
    """Resize (bicubic, PIL's default) keeping the aspect, centred on a black target_wh canvas."""
    tw, th = target_wh
    nw, nh = _fit_size(img.size, target_wh)
    out = Image.new("RGB", (tw, th), (0, 0, 0))
    out.paste(img.resize((nw, nh), Image.Resampling.BICUBIC), ((tw - nw) // 2, (th - nh) // 2))
    return out


def divide_to_patches(img: Image.Image, patch: int) -> list[Image.Image]:
    """patch x patch crops, row-major (left to right, then top to bottom); edges pad black."""
    w, h = img.size
    return [img.crop((x, y, x + patch, y + patch)) for y in range(0, h, patch) for x in range(0, w, patch)]


def anyres_pixel_values(
    img: Image.Image,
    pinpoints: Sequence[Sequence[int]],
    image_size: int,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> torch.Tensor:
    """[1 + n, 3, S, S]: the whole image squashed to S x S (bicubic), then the crops row-major.

    Every piece then goes through the CLIP pipeline, whose resize and crop are identities here.
    """
    img = img if img.mode == "RGB" else img.convert("RGB")
    padded = resize_and_pad(img, select_best_resolution(img.size, pinpoints))
    base = img.resize((image_size, image_size), Image.Resampling.BICUBIC)
    pieces = [base, *divide_to_patches(padded, image_size)]
    return torch.stack([clip_preprocess(p, image_size, mean, std) for p in pieces])  # [1+n, 3, S, S]


def _unpad_bounds(current_hw: Size, original_wh: Size) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) slice of a [.., H, W] map that drops the resize-and-pad border."""
    ch, cw = current_hw
    ow, oh = original_wh
    if ow / oh > cw / ch:  # wider than the map: bands were added top and bottom
        new_h = int(oh * (cw / ow))
        pad = (ch - new_h) // 2
        return pad, ch - pad, 0, cw
    new_w = int(ow * (ch / oh))
    pad = (cw - new_w) // 2
    return 0, ch, pad, cw - pad


def unpad_shape(current_hw: Size, original_wh: Size) -> Size:
    """(h, w) left by `unpad_image` on a map of size current_hw for an image of size original_wh."""
    top, bottom, left, right = _unpad_bounds(current_hw, original_wh)
    return bottom - top, right - left


def unpad_image(tensor: torch.Tensor, original_size_wh: Size) -> torch.Tensor:
    """Crop a [C, H, W] feature map back to the original aspect (a view, no copy)."""
    top, bottom, left, right = _unpad_bounds(tuple(tensor.shape[1:]), original_size_wh)
    return tensor[:, top:bottom, left:right]


def _check_merge_type(merge_type: str) -> None:
    if merge_type not in MERGE_TYPES:
        raise ValueError(f"merge_type={merge_type!r}; expected one of {MERGE_TYPES}")


def assemble_anyres_features(
    feats: torch.Tensor,
    image_size_wh: Size,
    pinpoints: Sequence[Sequence[int]],
    image_size: int,
    patch_side: int,
    image_newline: torch.Tensor | None,
    merge_type: str = "spatial_unpad",
) -> torch.Tensor:
    """Lay one image's projected crop features out as a token sequence.

    feats: [1 + n, P, C], index 0 the base image, then the crops row-major (P = patch_side**2).
    image_newline: [C], required for 'spatial_unpad'. Returns [N, C] with N = anyres_num_tokens(...):
    - 'flat': every crop's tokens in turn, base first;
    - 'spatial': base tokens, then the stitched map [gh*s, gw*s] row-major, no newline;
    - 'spatial_unpad': base tokens, then the stitched map unpadded, image_newline after each row.
    """
    _check_merge_type(merge_type)
    gw, gh = grid_shape(image_size_wh, pinpoints, image_size)
    s = patch_side
    n1, p, c = feats.shape
    if n1 != 1 + gw * gh or p != s * s:
        raise ValueError(
            f"assemble_anyres_features: feats {tuple(feats.shape)} but image {tuple(image_size_wh)} gives a "
            f"{gw}x{gh} grid, so expected [{1 + gw * gh}, {s * s}, C]"
        )
    if merge_type == "flat":
        return feats.reshape(n1 * p, c)  # [N, C]
    base = feats[0]  # [P, C]
    grid = feats[1:].view(gh, gw, s, s, c)  # [gh, gw, s, s, C]
    if merge_type == "spatial":
        hr = grid.permute(0, 2, 1, 3, 4).reshape(gh * s * gw * s, c)  # [gh*s*gw*s, C]
        return torch.cat([base, hr])
    if image_newline is None:
        raise ValueError("assemble_anyres_features: merge_type='spatial_unpad' needs image_newline")
    fmap = grid.permute(4, 0, 2, 1, 3).reshape(c, gh * s, gw * s)  # [C, gh*s, gw*s]
    fmap = unpad_image(fmap, image_size_wh)  # [C, h, w]
    h = fmap.shape[1]
    newline = image_newline.to(fmap.dtype).view(c, 1, 1).expand(c, h, 1)  # [C, h, 1]
    hr = torch.cat([fmap, newline], dim=2).permute(1, 2, 0).reshape(-1, c)  # [h*(w+1), C]
    return torch.cat([base, hr])  # [N, C]


def anyres_num_tokens(
    image_size_wh: Size,
    pinpoints: Sequence[Sequence[int]],
    image_size: int,
    patch_side: int,
    merge_type: str = "spatial_unpad",
) -> int:
    """Tokens `assemble_anyres_features` will return, from the image size alone (no model run)."""
    _check_merge_type(merge_type)
    gw, gh = grid_shape(image_size_wh, pinpoints, image_size)
    p = patch_side * patch_side
    if merge_type != "spatial_unpad":
        return p * (1 + gw * gh)
    h, w = unpad_shape((gh * patch_side, gw * patch_side), image_size_wh)
    return p + h * (w + 1)
