"""Image loading and the CLIP pixel pipeline of LLaVA-1.5 (`image_aspect_ratio='pad'`).

Why our own pipeline instead of `transformers.CLIPImageProcessor`: the checkpoints were trained
with the slow PIL processor of transformers 4.37, while transformers 5 defaults to a torchvision
"fast" processor whose antialiased bicubic differs by a few grey levels. The numbers below are the
4.37 ones, step by step, so pixel values match the official fixtures bit for bit:

1. resize the shortest edge to S with PIL bicubic; the long edge is `int(S * long / short)`
   (truncated, not rounded);
2. centre crop S x S at offset `(size - S) // 2` (floor: an odd surplus puts the extra pixel at
   the bottom / right);
3. rescale: `uint8 * (1/255)` in float64, then cast to float32;
4. normalise in float32: `(x - mean) / std` (a true division, not a multiply by 1/std).

Legend: S image side (the vision tower's input size), H/W height/width in pixels.
"""
from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageFile, UnidentifiedImageError

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "DEFAULT_MAX_PIXELS",
    "ImageLoadError",
    "load_image",
    "background_from_mean",
    "expand_to_square",
    "shortest_edge_size",
    "center_crop_box",
    "clip_preprocess",
    "pad_pixel_values",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_MAX_PIXELS = 100_000_000  # 100 MP: far above any real photo, far below a decompression bomb

ImageSource = str | os.PathLike | bytes | bytearray | Image.Image


class ImageLoadError(ValueError):
    """An image that cannot be used: it does not decode, or it is absurdly large."""


def _describe(source: ImageSource, name: str | None) -> str:
    if name is not None:
        return name
    if isinstance(source, (bytes, bytearray)):
        return f"<{len(source)} bytes>"
    if isinstance(source, Image.Image):
        return f"<PIL image {source.mode} {source.size[0]}x{source.size[1]}>"
    return os.fspath(source)


def _check_pixels(width: int, height: int, max_pixels: int, what: str) -> None:
    if width * height > max_pixels:
        raise ImageLoadError(
            f"{what}: image is {width}x{height} = {width * height:,} pixels, over max_pixels={max_pixels:,}; "
            "refusing to decode it (decompression bomb?)"
        )


def load_image(source: ImageSource, *, max_pixels: int = DEFAULT_MAX_PIXELS, name: str | None = None) -> Image.Image:
    """Open a path, encoded bytes or PIL image as a fully decoded RGB image.

    The size is checked from the header *before* decoding, against our own `max_pixels`, so a
    decompression bomb costs nothing; PIL's global `MAX_IMAGE_PIXELS` warning is silenced here
    (its hard error, at twice that, is turned into the same `ImageLoadError`). Truncated or
    corrupt files raise `ImageLoadError` naming the file, even where a library (lmms-eval does) has set
    PIL's global `ImageFile.LOAD_TRUNCATED_IMAGES`, which would make PIL pad them silently.
    EXIF orientation is NOT applied: LLaVA trained on `Image.open(p).convert('RGB')`. Alpha is
    dropped by `convert('RGB')` (no compositing), as there.
    """
    what = _describe(source, name)
    if isinstance(source, Image.Image):
        _check_pixels(*source.size, max_pixels, what)
        return source if source.mode == "RGB" else source.convert("RGB")
    fp = io.BytesIO(bytes(source)) if isinstance(source, (bytes, bytearray)) else source
    lenient, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(fp) as img:
                _check_pixels(*img.size, max_pixels, what)
                img.load()
                return img.convert("RGB")
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageLoadError(f"{what}: over PIL's hard size limit, not decoded: {e}") from e
    except FileNotFoundError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageLoadError(f"{what}: cannot decode image ({type(e).__name__}: {e})") from e
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = lenient


def background_from_mean(mean: Sequence[float]) -> tuple[int, int, int]:
    """LLaVA's pad colour: `int(x * 255)` per channel (truncated), (122, 116, 104) for CLIP."""
    return tuple(int(x * 255) for x in mean)  # type: ignore[return-value]


def expand_to_square(img: Image.Image, background_rgb: tuple[int, int, int]) -> Image.Image:
    """Pad the short side to make a square, image centred (offset floored), as LLaVA's expand2square."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), background_rgb)
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out


def shortest_edge_size(width: int, height: int, shortest_edge: int) -> tuple[int, int]:
    """(new_w, new_h) of transformers 4.37's `get_resize_output_image_size(default_to_square=False)`.

    The short side becomes `shortest_edge`; the long side is `int(shortest_edge * long / short)`,
    truncated. A tie (square) counts as width being the short side.
    """
    if width <= height:
        return shortest_edge, int(shortest_edge * height / width)
    return int(shortest_edge * width / height), shortest_edge


def center_crop_box(width: int, height: int, crop: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of transformers' centre crop: offsets `(size - crop) // 2`."""
    if width < crop or height < crop:
        # Never reached after a shortest-edge resize to `crop`; transformers would zero-pad here.
        raise ValueError(f"center_crop_box: image {width}x{height} is smaller than the crop {crop}")
    left, top = (width - crop) // 2, (height - crop) // 2
    return left, top, left + crop, top + crop


def clip_preprocess(
    img: Image.Image,
    image_size: int,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    rescale_factor: float = 1 / 255,
) -> torch.Tensor:
    """CLIPImageProcessor (transformers 4.37, PIL): resize, centre crop, rescale, normalise.

    Returns a float32 tensor [3, S, S]; bit-identical to the official pipeline with the same Pillow.
    """
    img = img if img.mode == "RGB" else img.convert("RGB")
    new_w, new_h = shortest_edge_size(*img.size, image_size)
    img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)  # same size: PIL returns a copy
    img = img.crop(center_crop_box(new_w, new_h, image_size))
    x = np.asarray(img, dtype=np.uint8)  # [S, S, 3]
    x = (x * np.float64(rescale_factor)).astype(np.float32)  # float64 product, then float32, as 4.37
    x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))  # [3, S, S]


def pad_pixel_values(
    img: Image.Image, image_size: int, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD
) -> torch.Tensor:
    """LLaVA-1.5 `image_aspect_ratio='pad'`: expand to square on the mean colour, then CLIP. [3, S, S]"""
    img = img if img.mode == "RGB" else img.convert("RGB")
    return clip_preprocess(expand_to_square(img, background_from_mean(mean)), image_size, mean, std)
