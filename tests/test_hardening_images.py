"""Hardening of image loading (issue 16): every PIL mode becomes RGB with its values mapped, not clipped (16-bit
grey was read as pure white); transparency composited on white; size, longest side and aspect ratio refused from
the header before anything is decoded or allocated (a few-hundred-byte 100000x1 PNG); EXIF orientation as an
option (off by default, as LLaVA)."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pmod.multimodal.images import ImageLoadError, expand_to_square, load_image


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _rgb(img) -> np.ndarray:
    return np.asarray(load_image(img), dtype=np.int64)


def test_16bit_grey_png_is_scaled_not_clipped_to_white():
    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    data = _png(Image.fromarray(ramp))
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    got = _rgb(data)
    want = (ramp.astype(np.int64) * 255 + 32767) // 65535
    assert (got == want[..., None]).all()
    assert got.min() == 0 and got.max() == 255 and len(np.unique(got)) == 256  # a full grey ramp, not a white page


def test_16bit_big_endian_pgm_is_scaled():
    v = np.array([[0, 257, 32896, 65535]], dtype=">u2")
    pgm = b"P5\n4 1\n65535\n" + v.tobytes()
    assert (_rgb(pgm)[0, :, 0] == [0, 1, 128, 255]).all()


def test_32bit_int_and_float_grey():
    sixteen = Image.fromarray(np.array([[0, 65535, 32896]], dtype=np.int32), mode="I")
    assert (_rgb(sixteen)[0, :, 0] == [0, 255, 128]).all()
    eight = Image.fromarray(np.array([[0, 200, 255]], dtype=np.int32), mode="I")  # 8-bit data held as I
    assert (_rgb(eight)[0, :, 0] == [0, 200, 255]).all()
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), mode="F")  # [0, 1] floats
    assert (_rgb(unit)[0, :, 0] == [0, 128, 255]).all()
    scaled = Image.fromarray(np.array([[0.0, 100.0, 300.0]], dtype=np.float32), mode="F")  # PIL's 0..255 floats
    assert (_rgb(scaled)[0, :, 0] == [0, 100, 255]).all()
    nan = Image.fromarray(np.array([[0.0, np.nan]], dtype=np.float32), mode="F")
    with pytest.raises(ImageLoadError, match="NaN"):
        load_image(nan)


def test_transparency_is_composited_on_white():
    la = Image.fromarray(np.array([[[50, 0], [50, 255], [50, 128]]], dtype=np.uint8), mode="LA")
    assert (_rgb(la)[0, :, 0] == [255, 50, 152]).all()  # 50·a + 255·(1 - a): 152.1 at a = 128/255
    p = Image.new("P", (2, 1))
    p.putpalette([10, 20, 30, 200, 100, 0] + [0] * 762)
    p.putpixel((0, 0), 0)
    p.putpixel((1, 0), 1)
    p.info["transparency"] = 0  # palette index 0 is transparent
    assert _rgb(_png(p)).tolist() == [[[255, 255, 255], [200, 100, 0]]]
    rgba = Image.new("RGBA", (1, 1), (0, 0, 0, 0))  # fully transparent black: white, not black
    assert _rgb(rgba).tolist() == [[[255, 255, 255]]]
    premult = Image.new("RGBA", (1, 1), (200, 100, 0, 255)).convert("RGBa")
    assert _rgb(premult).tolist() == [[[200, 100, 0]]]


def test_other_modes_through_pil():
    cmyk = Image.new("CMYK", (2, 1))
    cmyk.putpixel((0, 0), (0, 0, 0, 0))
    cmyk.putpixel((1, 0), (255, 0, 0, 0))
    assert _rgb(cmyk).tolist() == [[[255, 255, 255], [0, 255, 255]]]
    for mode in ("1", "L", "P", "YCbCr", "LAB", "HSV", "RGBX", "I;16B"):
        img = load_image(Image.new(mode, (3, 2)))
        assert img.mode == "RGB" and img.size == (3, 2), mode


def test_a_tiny_100000x1_png_is_refused_before_decoding():
    strip = _png(Image.new("RGB", (100_000, 1)))
    assert len(strip) < 1000  # a few hundred bytes
    with pytest.raises(ImageLoadError, match=r"100000x1.*(max_side|aspect ratio)"):
        load_image(strip)
    from conftest import tiny_config, tiny_tokenizer

    from pmod.multimodal.processor import PmodProcessor

    for aspect in ("pad", "square", "anyres"):
        cfg = tiny_config().replace(image_aspect_ratio=aspect, image_grid_pinpoints=[[42, 84], [84, 42]] if aspect == "anyres" else None,
                                    mm_patch_merge_type="spatial_unpad" if aspect == "anyres" else "flat")
        with pytest.raises(ImageLoadError, match="100000x1"):
            PmodProcessor(tiny_tokenizer(), cfg).process_images([strip])


def test_longest_side_and_aspect_ratio_guards_are_adjustable():
    wide = _png(Image.new("L", (40_000, 300)))  # 12 MP, aspect 133: only the side is too long
    with pytest.raises(ImageLoadError, match=r"40000x300, its longest side is over max_side=32,768"):
        load_image(wide)
    assert load_image(wide, max_side=50_000).size == (40_000, 300)
    thin = _png(Image.new("L", (3000, 10)))
    with pytest.raises(ImageLoadError, match=r"aspect ratio of 300:1, over max_aspect_ratio=200"):
        load_image(thin)
    assert load_image(thin, max_aspect_ratio=400).size == (3000, 10)


def test_pad_refuses_a_canvas_over_the_pixel_budget():
    img = Image.new("RGB", (12_000, 3_000))  # 36 MP: loadable, but pad would build 144 MP
    with pytest.raises(ImageLoadError, match=r"12000x12000 canvas"):
        expand_to_square(img, (0, 0, 0))


def _exif_jpeg(orientation: int) -> bytes:
    img = Image.new("RGB", (40, 20), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes())
    return buf.getvalue()


def test_exif_orientation_is_an_option_off_by_default():
    rotated = _exif_jpeg(6)  # "rotate 90 CW to display"
    assert load_image(rotated).size == (40, 20)  # LLaVA's pipeline ignores EXIF: the default too
    assert load_image(rotated, exif_transpose=True).size == (20, 40)
    from conftest import tiny_config, tiny_tokenizer

    from pmod.multimodal.processor import PmodProcessor

    _, sizes = PmodProcessor(tiny_tokenizer(), tiny_config(), exif_transpose=True).process_images([rotated])
    assert sizes == [(20, 40)]
