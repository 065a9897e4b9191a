"""LLaVA-NeXT anyres: grid choice, crops, unpadding and the feature layout, against the official fixtures."""
from __future__ import annotations

import json
import math
import random
from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from pmod.multimodal.anyres import (
    NEXT_GRIDS,
    anyres_num_tokens,
    anyres_pixel_values,
    assemble_anyres_features,
    divide_to_patches,
    grid_shape,
    pinpoints_from_grids,
    resize_and_pad,
    select_best_resolution,
    unpad_image,
    unpad_shape,
)
from pmod.multimodal.images import clip_preprocess, load_image

S, s = 70, 5  # tiny CLIP: 70 px crops, 14 px patches -> 5 x 5 tokens per crop


@pytest.fixture(scope="module")
def anyres_manifest(official_dir) -> dict:
    return json.loads((official_dir / "manifest.json").read_text())["anyres"]


@pytest.fixture(scope="module")
def pinpoints(official_dir) -> list[list[int]]:
    return json.loads((official_dir / "anyres" / "config.json").read_text())["image_grid_pinpoints"]


# --- the official fixture --------------------------------------------------------------------------


def test_next_pinpoints_are_the_recipe_grids(pinpoints, anyres_manifest):
    assert pinpoints_from_grids(NEXT_GRIDS[4], S) == pinpoints == anyres_manifest["image_grid_pinpoints"]


def test_pixels_match_official_exactly(official_dir, pinpoints):
    ref = load_file(str(official_dir / "anyres.safetensors"))["images"][0]  # [1+n, 3, S, S]
    got = anyres_pixel_values(load_image(official_dir / "images" / "img0.png"), pinpoints, S)
    assert got.shape == ref.shape == (3, 3, S, S)
    assert torch.equal(got, ref)


def test_grid_and_token_facts_match_manifest(anyres_manifest, pinpoints):
    size = tuple(anyres_manifest["image_size_wh"])
    assert select_best_resolution(size, pinpoints) == tuple(anyres_manifest["selected_resolution_wh"])
    assert grid_shape(size, pinpoints, S) == tuple(anyres_manifest["grid_wh"])
    gw, gh = grid_shape(size, pinpoints, S)
    assert unpad_shape((gh * s, gw * s), size) == (anyres_manifest["hr_rows_after_unpad"], anyres_manifest["hr_cols_after_unpad"])
    assert anyres_num_tokens(size, pinpoints, S, s) == anyres_manifest["num_image_features"] == 70
    feats = torch.randn(1 + gw * gh, s * s, 8)
    out = assemble_anyres_features(feats, size, pinpoints, S, s, torch.randn(8))
    assert out.shape[0] == anyres_manifest["base_tokens"] + anyres_manifest["hr_tokens_incl_newline"]


@pytest.fixture(scope="module")
def tiny_clip_features(official_dir):
    """The official image through transformers' CLIPVisionModel (checkpoint weights) and the projector."""
    transformers = pytest.importorskip("transformers")
    sd = load_file(str(official_dir / "checkpoint" / "model.safetensors"))
    tower = transformers.CLIPVisionModel(transformers.CLIPVisionConfig.from_pretrained(official_dir / "checkpoint" / "tiny-clip"))
    prefix = "model.vision_tower.vision_tower.vision_model."  # transformers 4.37 names; 5.x drops "vision_model."
    tower.load_state_dict({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)})
    pixels = load_file(str(official_dir / "anyres.safetensors"))["images"][0]
    with torch.no_grad():
        x = tower.eval()(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]  # [1+n, P, Cv]
        x = torch.nn.functional.gelu(torch.nn.functional.linear(x, sd["model.mm_projector.0.weight"], sd["model.mm_projector.0.bias"]))
        return torch.nn.functional.linear(x, sd["model.mm_projector.2.weight"], sd["model.mm_projector.2.bias"])  # [1+n, P, C]


def test_assembled_features_match_official_merged_embeddings(official_dir, anyres_manifest, pinpoints, tiny_clip_features):
    ref = load_file(str(official_dir / "anyres.safetensors"))["inputs_embeds"][0]  # [79, C]
    newline = load_file(str(official_dir / "anyres" / "image_newline.safetensors"))["model.image_newline"]
    first, last = anyres_manifest["vision_positions"]
    out = assemble_anyres_features(tiny_clip_features, (101, 60), pinpoints, S, s, newline)
    assert out.shape == (last - first + 1, ref.shape[1])
    torch.testing.assert_close(out, ref[first:last + 1], rtol=0, atol=1e-5)
    # the newline rows: after each of the 5 rows of 8 high-res tokens, i.e. at 25 + 9r + 8
    rows = [25 + 9 * r + 8 for r in range(5)]
    assert all(torch.equal(ref[first + i], newline) for i in rows)


# --- pure functions, independently -----------------------------------------------------------------


def _best_by_key(size, pinpoints):
    """Oracle: max effective pixels, then min waste, then first listed; same float fit as official."""
    ow, oh = size

    def key(item):
        i, (w, h) = item
        scale = min(w / ow, h / oh)
        eff = min(int(ow * scale) * int(oh * scale), ow * oh)
        return (-eff, w * h - eff, i)

    _, best = min(enumerate(pinpoints), key=key)
    return tuple(best)


def test_select_best_resolution_oracle_many_sizes():
    pins = pinpoints_from_grids(NEXT_GRIDS[9], 336)
    rng = random.Random(0)
    for _ in range(2000):
        size = (rng.randint(1, 3000), rng.randint(1, 3000))
        assert select_best_resolution(size, pins) == _best_by_key(size, pins), size


def test_select_best_resolution_cases():
    pins = pinpoints_from_grids(NEXT_GRIDS[4], 336)
    assert select_best_resolution((1000, 500), pins) == (672, 336)
    assert select_best_resolution((500, 1000), pins) == (336, 672)
    assert select_best_resolution((900, 900), pins) == (672, 672)
    assert select_best_resolution((100, 100), pins) == (336, 672)  # all keep 10^4 px: first of least waste
    assert select_best_resolution((1500, 400), pins) == (1008, 336)
    # a 2500:1 strip keeps 0 px everywhere: the tie goes to the least waste, then the first listed
    assert select_best_resolution((5000, 2), pins) == (336, 672)
    with pytest.raises(ValueError, match="no usable pinpoint"):
        select_best_resolution((100, 100), [])


def test_extreme_strip_keeps_no_high_res_rows():
    """Official arithmetic on a 5000 x 2 image: unpad keeps int(2 * 24/5000) = 0 rows of the 48 x 24 map."""
    pins = pinpoints_from_grids(NEXT_GRIDS[4], 336)
    assert unpad_shape((48, 24), (5000, 2)) == (0, 24)
    assert anyres_num_tokens((5000, 2), pins, 336, 24) == 576
    out = assemble_anyres_features(torch.zeros(3, 576, 2), (5000, 2), pins, 336, 24, torch.ones(2))
    assert out.shape == (576, 2)


def test_resize_and_pad_places_image_on_black():
    img = Image.new("RGB", (101, 60), (200, 100, 50))
    out = np.asarray(resize_and_pad(img, (140, 70)))  # height tight: width ceil(101 * 70/60) = 118
    assert out.shape == (70, 140, 3)
    cols = np.where(out.any(axis=(0, 2)))[0]
    assert (cols.min(), cols.max()) == (11, 11 + 118 - 1)  # paste x = (140 - 118) // 2
    tall = np.asarray(resize_and_pad(Image.new("RGB", (50, 91), (9, 9, 9)), (70, 140)))
    rows = np.where(tall.any(axis=(1, 2)))[0]
    assert (rows.min(), rows.max()) == (6, 6 + 128 - 1)  # width tight: ceil(91 * 1.4) = 128 rows


def test_divide_to_patches_is_row_major():
    grid = np.zeros((2 * 4, 3 * 4, 3), np.uint8)
    for r in range(2):
        for c in range(3):
            grid[r * 4:(r + 1) * 4, c * 4:(c + 1) * 4] = 10 * r + c
    crops = divide_to_patches(Image.fromarray(grid), 4)
    assert [int(np.asarray(p)[0, 0, 0]) for p in crops] == [0, 1, 2, 10, 11, 12]
    assert all(p.size == (4, 4) for p in crops)


def test_pixel_values_layout(pinpoints):
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (91, 50, 3), dtype=np.uint8))
    x = anyres_pixel_values(img, pinpoints, S)  # 50x91 -> (70, 140): grid 1 x 2
    assert x.shape == (3, 3, S, S)
    assert torch.equal(x[0], clip_preprocess(img.resize((S, S), Image.Resampling.BICUBIC), S))  # squashed, no pad
    padded = resize_and_pad(img, (70, 140))
    assert torch.equal(x[2], clip_preprocess(padded.crop((0, 70, 70, 140)), S))


def test_unpad_rounding_quirks():
    # map 5 x 10 for a 101 x 60 image: int(101 * 5 / 60) = 8 columns, cut (10 - 8) // 2 = 1 each side
    assert unpad_shape((5, 10), (101, 60)) == (5, 8)
    # an odd surplus keeps one extra row: new_h = int(70 * 10/100) = 7, cut 1 each side -> 8 rows
    assert unpad_shape((10, 10), (100, 70)) == (8, 10)
    # float truncation: 55 * (48 / 176) = 14.999... -> 14, so 16 -> 14 columns kept (exactly 15 would keep 16)
    assert unpad_shape((48, 48), (55, 176)) == (48, 14)
    # equal aspect: nothing cut
    assert unpad_shape((24, 48), (200, 100)) == (24, 48)


def test_unpad_image_slices_the_centre():
    t = torch.arange(10 * 10).view(1, 10, 10)
    out = unpad_image(t, (100, 70))
    assert out.shape == (1, 8, 10) and torch.equal(out, t[:, 1:9, :])
    out = unpad_image(t, (70, 100))
    assert out.shape == (1, 10, 8) and torch.equal(out, t[:, :, 1:9])


def test_unpad_is_close_to_exact_aspect():
    """Within 1 row/col of the exact fitted size (plus the odd-surplus row), never larger than the map."""
    for ch, cw in [(24, 48), (48, 24), (48, 48), (24, 72), (72, 24)]:
        for ow in range(1, 400, 7):
            for oh in range(1, 400, 11):
                h, w = unpad_shape((ch, cw), (ow, oh))
                assert 0 <= h <= ch and 0 <= w <= cw
                if Fraction(ow, oh) > Fraction(cw, ch):
                    assert w == cw and abs(h - math.floor(Fraction(oh * cw, ow))) <= 2
                else:
                    assert h == ch and abs(w - math.floor(Fraction(ow * ch, oh))) <= 2


# --- feature assembly ------------------------------------------------------------------------------


def _coded_feats(n_crops: int, side: int) -> torch.Tensor:
    """feats[k, i*side + j] = (k, i, j, 0): every token names its crop and patch. [n, P, 4]"""
    k, i, j = torch.meshgrid(torch.arange(n_crops), torch.arange(side), torch.arange(side), indexing="ij")
    return torch.stack([k, i, j, torch.zeros_like(k)], -1).reshape(n_crops, side * side, 4).float()


@pytest.mark.parametrize("size", [(101, 60), (50, 91), (300, 100), (64, 64), (97, 203)])
def test_assembly_layout_by_coordinates(size, pinpoints):
    gw, gh = grid_shape(size, pinpoints, S)
    feats = _coded_feats(1 + gw * gh, s)
    newline = torch.tensor([-1.0, -1.0, -1.0, -1.0])
    base = feats[0]

    def token(r: int, c: int) -> torch.Tensor:  # high-res map position -> (crop, row, col)
        return torch.tensor([1 + (r // s) * gw + c // s, r % s, c % s, 0.0])

    flat = assemble_anyres_features(feats, size, pinpoints, S, s, None, "flat")
    assert torch.equal(flat, feats.reshape(-1, 4))

    spatial = assemble_anyres_features(feats, size, pinpoints, S, s, None, "spatial")
    want = torch.stack([token(r, c) for r in range(gh * s) for c in range(gw * s)])
    assert torch.equal(spatial[: s * s], base) and torch.equal(spatial[s * s:], want)

    unpad = assemble_anyres_features(feats, size, pinpoints, S, s, newline, "spatial_unpad")
    top = left = 0
    h, w = unpad_shape((gh * s, gw * s), size)
    if h < gh * s:
        top = (gh * s - h) // 2
    if w < gw * s:
        left = (gw * s - w) // 2
    rows = [torch.stack([*(token(top + r, left + c) for c in range(w)), newline]) for r in range(h)]
    assert torch.equal(unpad[: s * s], base) and torch.equal(unpad[s * s:], torch.cat(rows))


def test_num_tokens_equals_assembled_length_many_sizes():
    rng = random.Random(0)
    configs = [(pinpoints_from_grids(NEXT_GRIDS[4], 70), 70, 5), (pinpoints_from_grids(NEXT_GRIDS[9], 336), 336, 24)]
    for pins, size_px, side in configs:
        for _ in range(150):
            size = (rng.randint(1, 2500), rng.randint(1, 2500))
            gw, gh = grid_shape(size, pins, size_px)
            feats = torch.zeros(1 + gw * gh, side * side, 2)
            for merge in ("flat", "spatial", "spatial_unpad"):
                out = assemble_anyres_features(feats, size, pins, size_px, side, torch.ones(2), merge)
                assert out.shape[0] == anyres_num_tokens(size, pins, size_px, side, merge), (size, merge)


def test_llava_next_7b_paper_count():
    """Spec §8: a 2x2 grid at 336 px gives 576 base + 48 * 49 tokens (square image, nothing unpadded)."""
    pins = pinpoints_from_grids(NEXT_GRIDS[4], 336)
    assert anyres_num_tokens((1000, 1000), pins, 336, 24) == 576 + 48 * 49 == 2928


def test_assembly_errors(pinpoints):
    feats = torch.zeros(3, s * s, 4)
    with pytest.raises(ValueError, match="expected one of"):
        assemble_anyres_features(feats, (101, 60), pinpoints, S, s, None, "spatial_pad")
    with pytest.raises(ValueError, match="needs image_newline"):
        assemble_anyres_features(feats, (101, 60), pinpoints, S, s, None, "spatial_unpad")
    with pytest.raises(ValueError, match=r"2x1 grid.*\[3, 25, C\]"):
        assemble_anyres_features(torch.zeros(4, s * s, 4), (101, 60), pinpoints, S, s, torch.zeros(4))
    with pytest.raises(ValueError, match="expected one of"):
        anyres_num_tokens((101, 60), pinpoints, S, s, "unpad")
