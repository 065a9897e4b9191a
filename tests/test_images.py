"""Image loading and the LLaVA-1.5 'pad' pixel pipeline against the official fixtures."""
from __future__ import annotations

import io
import json
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from pmod.multimodal.images import (
    CLIP_MEAN,
    CLIP_STD,
    ImageLoadError,
    background_from_mean,
    center_crop_box,
    clip_preprocess,
    expand_to_square,
    load_image,
    pad_pixel_values,
    shortest_edge_size,
)

S = 70  # the tiny CLIP's input side


def _png_header(width: int, height: int) -> bytes:
    """A valid PNG signature + IHDR claiming width x height, with a token IDAT: costs 68 bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 8)) + chunk(b"IEND", b"")


def _encode_png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _random_image(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


# --- the official fixture --------------------------------------------------------------------------


def test_pad_pixels_match_official_exactly(official_dir):
    ref = load_file(str(official_dir / "preprocess.safetensors"))
    clip_cfg = json.loads((official_dir / "checkpoint" / "tiny-clip" / "preprocessor_config.json").read_text())
    for i, (w, h) in enumerate(ref["image_sizes_wh"].tolist()):
        img = load_image(official_dir / "images" / f"img{i}.png")
        assert img.size == (w, h) and img.mode == "RGB"
        got = pad_pixel_values(img, S, clip_cfg["image_mean"], clip_cfg["image_std"])
        assert got.dtype == torch.float32 and got.shape == (3, S, S)
        assert torch.equal(got, ref["pixel_values"][i]), f"img{i}: max diff {(got - ref['pixel_values'][i]).abs().max()}"


def test_background_is_truncated_mean():
    assert background_from_mean(CLIP_MEAN) == (122, 116, 104)


# --- independent checks of each step ---------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_pil_clip():
    """transformers 5 keeps a PIL-backed CLIP processor (its default is a torchvision one that differs
    by up to ~0.015 after normalisation); the PIL one agrees bit for bit with 4.37's slow processor."""
    pil_backend = pytest.importorskip("transformers.models.clip.image_processing_pil_clip")
    return pil_backend.CLIPImageProcessorPil(
        size={"shortest_edge": S}, crop_size={"height": S, "width": S}, image_mean=CLIP_MEAN, image_std=CLIP_STD
    )


@pytest.mark.parametrize(("w", "h"), [(101, 60), (50, 91), (97, 71), (71, 97), (13, 17), (1, 300), (300, 1), (70, 70)])
def test_clip_preprocess_matches_transformers_pil_backend(hf_pil_clip, w, h):
    img = _random_image(w, h)
    want = torch.as_tensor(np.asarray(hf_pil_clip(img, return_tensors="pt")["pixel_values"][0]))
    assert torch.equal(clip_preprocess(img, S), want)


def test_clip_preprocess_float64_oracle():
    """Same steps in float64 from the uint8 crop: agrees to float32 rounding (independent of the cast order)."""
    img = _random_image(97, 53, seed=3)
    nw, nh = shortest_edge_size(97, 53, S)
    crop = np.asarray(img.resize((nw, nh), Image.Resampling.BICUBIC).crop(center_crop_box(nw, nh, S)), np.float64)
    want = (crop / 255.0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)  # [S, S, 3]
    got = clip_preprocess(img, S).double().permute(1, 2, 0).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_resize_size_truncates_and_crop_floors():
    assert shortest_edge_size(101, 60, 70) == (117, 70)  # 70 * 101 / 60 = 117.83 -> 117
    assert shortest_edge_size(60, 101, 70) == (70, 117)
    assert shortest_edge_size(64, 64, 70) == (70, 70)
    assert center_crop_box(117, 70, 70) == (23, 0, 93, 70)  # surplus 47: 23 left, 24 right
    assert center_crop_box(70, 71, 70) == (0, 0, 70, 70)  # surplus 1 goes to the bottom
    with pytest.raises(ValueError, match="smaller than the crop"):
        center_crop_box(69, 80, 70)


def test_expand_to_square_centres_with_floor():
    img = Image.new("RGB", (5, 2), (255, 0, 0))
    sq = np.asarray(expand_to_square(img, (1, 2, 3)))
    assert sq.shape == (5, 5, 3)
    red_rows = np.where((sq == [255, 0, 0]).all(-1).all(-1))[0]
    assert red_rows.tolist() == [1, 2]  # (5 - 2) // 2 = 1 row above, 2 below
    assert (sq[0] == [1, 2, 3]).all() and (sq[3:] == [1, 2, 3]).all()
    tall = expand_to_square(Image.new("RGB", (2, 5)), (0, 0, 0))
    assert tall.size == (5, 5)
    square = Image.new("RGB", (4, 4))
    assert expand_to_square(square, (0, 0, 0)) is square


def test_odd_sizes_and_modes_give_s_by_s():
    for w, h in [(1, 1), (1, 2), (3, 1000), (1000, 3), (71, 69)]:
        assert pad_pixel_values(_random_image(w, h), S).shape == (3, S, S)
    rgba = Image.new("RGBA", (30, 20), (10, 20, 30, 0))
    grey = Image.new("L", (30, 20), 7)
    assert load_image(rgba).mode == "RGB" and load_image(grey).mode == "RGB"
    # transparency is composited on white (transformers' convert_to_rgb), not dropped to the hidden colour
    assert torch.equal(pad_pixel_values(rgba, S), pad_pixel_values(Image.new("RGB", (30, 20), (255, 255, 255)), S))


# --- loading: sources and errors -------------------------------------------------------------------


def test_load_from_path_bytes_and_pil_agree(official_dir):
    path = official_dir / "images" / "img1.png"
    a, b, c = load_image(path), load_image(path.read_bytes()), load_image(Image.open(path))
    assert np.array_equal(np.asarray(a), np.asarray(b)) and np.array_equal(np.asarray(a), np.asarray(c))


def test_truncated_png_is_named(tmp_path, official_dir):
    data = (official_dir / "images" / "img0.png").read_bytes()
    bad = tmp_path / "truncated.png"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match="truncated.png"):
        load_image(bad)


def test_not_an_image_is_named(tmp_path):
    bad = tmp_path / "notes.jpg"
    bad.write_text("this is not a JPEG")
    with pytest.raises(ImageLoadError, match=r"notes\.jpg.*cannot decode"):
        load_image(bad)
    with pytest.raises(ImageLoadError, match="my-upload"):
        load_image(b"garbage", name="my-upload")


def test_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "nope.png")


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header(12_000, 10_000))  # 120 MP: over our 100 MP default, under PIL's hard error
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's global DecompressionBombWarning must not leak out
        with pytest.raises(ImageLoadError, match=r"bomb\.png.*12000x10000"):
            load_image(bomb)
    with pytest.raises(ImageLoadError, match="max_pixels=1,000"):
        load_image(_png_header(100, 100), max_pixels=1_000)
    with pytest.raises(ImageLoadError, match="2500000000"):  # PIL's own hard limit, reported as ours
        load_image(_png_header(50_000, 50_000))
    with pytest.raises(ImageLoadError, match="200x300"):  # in-memory images are checked too
        load_image(Image.new("RGB", (200, 300)), max_pixels=10_000)


def test_limit_can_be_raised():
    img = load_image(_encode_png(_random_image(40, 30)), max_pixels=40 * 30)
    assert img.size == (40, 30)
