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
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MAX_SIDE",
    "DEFAULT_MAX_ASPECT_RATIO",
    "ImageLoadError",
    "load_image",
    "to_rgb",
    "check_image_size",
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
DEFAULT_MAX_SIDE = 32_768  # longest side in pixels
DEFAULT_MAX_ASPECT_RATIO = 200.0  # long side / short side (Qwen2-VL's bound): a 100000x1 strip is no photo

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


def check_image_size(width: int, height: int, what: str, max_pixels: int = DEFAULT_MAX_PIXELS, max_side: int = DEFAULT_MAX_SIDE,
                     max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO) -> None:
    """Refuse absurd sizes from the header alone: total pixels, longest side, aspect ratio (a 375-byte
    100000x1 PNG would otherwise become a 10^10-pixel square canvas in `pad`, or a 33.6M x 336 resize in `square`)."""
    if width < 1 or height < 1:
        raise ImageLoadError(f"{what}: image is {width}x{height}, empty")
    if width * height > max_pixels:
        raise ImageLoadError(
            f"{what}: image is {width}x{height} = {width * height:,} pixels, over max_pixels={max_pixels:,}; "
            "refusing to decode it (decompression bomb?)"
        )
    if max(width, height) > max_side:
        raise ImageLoadError(f"{what}: image is {width}x{height}, its longest side is over max_side={max_side:,}; refusing "
                             f"to decode it")
    if max(width, height) / min(width, height) > max_aspect_ratio:
        raise ImageLoadError(f"{what}: image is {width}x{height}, an aspect ratio of {max(width, height) / min(width, height):,.0f}:1, "
                             f"over max_aspect_ratio={max_aspect_ratio:g}; refusing to decode it")


_check_pixels = check_image_size  # the earlier name


def to_rgb(img: Image.Image, what: str = "image") -> Image.Image:
    """Any PIL mode as 8-bit RGB, values mapped, not clipped: 16-bit grey (I;16*) scaled 65535 -> 255; 32-bit
    integer grey (I) scaled so when it holds values above 255 (16-bit data), else taken as 8-bit; float grey (F)
    taken as [0, 1] when it lies there, else as [0, 255] (PIL's convention), NaN refused; transparency (RGBA, LA,
    PA, premultiplied modes, P / L / RGB with a transparent colour) composited on white, as transformers'
    `convert_to_rgb` does; CMYK, YCbCr, LAB, HSV, 1, P through PIL's own conversions."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode == "I" or mode == "F":
        a = np.asarray(img)
        if mode == "F":
            if not np.isfinite(a).all():
                raise ImageLoadError(f"{what}: a float image (mode F) holding NaN or Inf")
            a = a * 255.0 if a.min(initial=0.0) >= 0.0 and a.max(initial=0.0) <= 1.0 else a
            eight = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        else:
            a = a.astype(np.int64)
            if mode.startswith("I;16") or a.max(initial=0) > 255 or a.min(initial=0) < 0:
                a = np.clip(a, 0, 65535)
                eight = ((a * 255 + 32767) // 65535).astype(np.uint8)  # round(v * 255 / 65535)
            else:
                eight = a.astype(np.uint8)
        return Image.fromarray(eight, "L").convert("RGB")
    if mode in ("RGBa", "La"):  # premultiplied alpha: un-premultiply first
        img = img.convert({"RGBa": "RGBA", "La": "LA"}[mode])
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(source: ImageSource, *, max_pixels: int = DEFAULT_MAX_PIXELS, max_side: int = DEFAULT_MAX_SIDE,
               max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO, exif_transpose: bool = False,
               name: str | None = None) -> Image.Image:
    """Open a path, encoded bytes or PIL image as a fully decoded RGB image.

    The size is checked from the header *before* decoding (total pixels, longest side, aspect ratio), so a
    decompression bomb or a 100000x1 strip costs nothing; PIL's global `MAX_IMAGE_PIXELS` warning is silenced
    here (its hard error, at twice that, is turned into the same `ImageLoadError`). Truncated or corrupt files
    raise `ImageLoadError` naming the file, even where a library (lmms-eval does) has set PIL's global
    `ImageFile.LOAD_TRUNCATED_IMAGES`, which would make PIL pad them silently. Every mode becomes RGB by
    `to_rgb` (16-bit scaled, transparency on white). EXIF orientation is applied only with
    `exif_transpose=True`: LLaVA trained on `Image.open(p).convert('RGB')`, which ignores it, so the default
    shows the model what it saw in training.
    """
    what = _describe(source, name)
    limits = {"max_pixels": max_pixels, "max_side": max_side, "max_aspect_ratio": max_aspect_ratio}
    if isinstance(source, Image.Image):
        check_image_size(*source.size, what, **limits)
        img = ImageOps.exif_transpose(source) if exif_transpose else source
        return to_rgb(img, what)
    fp = io.BytesIO(bytes(source)) if isinstance(source, (bytes, bytearray)) else source
    lenient, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(fp) as img:
                check_image_size(*img.size, what, **limits)
                img.load()
                if exif_transpose:
                    img = ImageOps.exif_transpose(img)
                return to_rgb(img, what)
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


def expand_to_square(img: Image.Image, background_rgb: tuple[int, int, int], max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Pad the short side to make a square, image centred (offset floored), as LLaVA's expand2square."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    if side * side > max_pixels:  # the canvas, not the image, is what pad allocates
        raise ImageLoadError(f"image {w}x{h}: padding it to a square needs a {side}x{side} canvas, over "
                             f"max_pixels={max_pixels:,}; resize it first")
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
    new_w, new_h = shortest_edge_size(*img.size, image_size)
    if new_w * new_h > DEFAULT_MAX_PIXELS:  # checked before the resize allocates: its long side is S x the aspect ratio
        raise ImageLoadError(f"image {img.size[0]}x{img.size[1]}: resizing its short side to {image_size} gives "
                             f"{new_w}x{new_h}, over {DEFAULT_MAX_PIXELS:,} pixels; crop or resize it first")
    img = to_rgb(img)
    img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)  # same size: PIL returns a copy
    img = img.crop(center_crop_box(new_w, new_h, image_size))
    x = np.asarray(img, dtype=np.uint8)  # [S, S, 3]
    x = (x * np.float64(rescale_factor)).astype(np.float32)  # float64 product, then float32, as 4.37
    x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))  # [3, S, S]


def pad_pixel_values(
    img: Image.Image, image_size: int, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> torch.Tensor:
    """LLaVA-1.5 `image_aspect_ratio='pad'`: expand to square on the mean colour, then CLIP. [3, S, S]"""
    img = to_rgb(img)
    return clip_preprocess(expand_to_square(img, background_from_mean(mean), max_pixels), image_size, mean, std)
