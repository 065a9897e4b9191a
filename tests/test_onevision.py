"""LLaVA-OneVision (transformers' `llava_onevision`) loaded from its own save_pretrained, against its own forward."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import make_batch
from vlm_common import assert_greedy_matches, randomize_and_save

import pmod
from pmod.multimodal.anyres import grid_shape
from pmod.multimodal.onevision import (
    assemble_onevision_features,
    onevision_num_tokens,
    onevision_unpad_bounds,
    parse_anyres_max,
)

IMG = 110  # <image> id in these tiny models
S, PATCH = 42, 14  # crop side, SigLIP patch: 3 x 3 tokens per crop
PINS_HW = [[42, 42], [42, 84], [84, 42], [84, 84], [42, 126], [126, 42], [126, 126]]  # transformers' (height, width)


def tiny_onevision_hf(folder, aspect="anyres_max_9", tie=False, seed=0):
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )

    torch.manual_seed(seed)
    tc = Qwen2Config(vocab_size=120, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-6, tie_word_embeddings=tie,
                     rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    vc = SiglipVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, image_size=S,
                            patch_size=PATCH, vision_use_head=False)
    cfg = LlavaOnevisionConfig(text_config=tc, vision_config=vc, image_token_index=IMG, video_token_index=111,
                               image_grid_pinpoints=PINS_HW, vision_aspect_ratio=aspect, tie_word_embeddings=tie)
    return randomize_and_save(LlavaOnevisionForConditionalGeneration(cfg).eval(), folder)


def hf_ids(ids: torch.Tensor, counts: list[int], mask: torch.Tensor | None = None):
    """Our one -200 per image -> transformers' runs of <image> ids; rows left-padded to a common length."""
    rows, it = [], iter(counts)
    for b, r in enumerate(ids.tolist()):
        keep = r if mask is None else [t for t, m in zip(r, mask[b].tolist()) if m]
        out = []
        for t in keep:
            out += [IMG] * next(it) if t == pmod.IMAGE_TOKEN_INDEX else [t]
        rows.append(out)
    T = max(map(len, rows))
    return (torch.tensor([[0] * (T - len(r)) + r for r in rows]),
            torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows]))


def crops_for(size_wh, seed=0):
    gw, gh = grid_shape(size_wh, [[w, h] for h, w in PINS_HW], S)
    return torch.randn(1 + gw * gh, 3, S, S, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=["anyres_max_9", "anyres_max_1"])
def pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ov")
    hf = tiny_onevision_hf(folder, aspect=request.param)
    return hf, pmod.from_pretrained(folder, dtype=torch.float32), folder


def test_config_translated(pair):
    _, ours, folder = pair
    c = ours.config
    raw = json.loads((folder / "config.json").read_text())
    assert c.text.qkv_bias and not c.text.o_bias and c.text.rope_theta == 1e6 and c.vision.backend == "siglip"
    assert c.anyres_max_crops == parse_anyres_max(raw["vision_aspect_ratio"]) and c.uses_image_newline
    assert c.image_grid_pinpoints[1] == [84, 42]  # (w, h) from transformers' (h, w)
    assert c.vision.select_layer == -1 and c.vision.num_patches == 9 and c.is_dense


@pytest.mark.parametrize("size_wh", [(97, 45), (37, 101), (130, 129), (40, 40), (94, 47)])
def test_logits_match_transformers(pair, size_wh):
    hf, ours, _ = pair
    crops = crops_for(size_wh)
    n = ours.image_token_counts([crops], [size_wh])[0]
    ids, _, _ = make_batch([(4, 1, 5)], vocab=100)
    hids, _ = hf_ids(ids, [n])
    with torch.no_grad():
        ref = hf(input_ids=hids, pixel_values=crops[None], image_sizes=torch.tensor([size_wh[::-1]])).logits
        got = ours(input_ids=ids, images=[crops], image_sizes=[size_wh]).logits
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_batch_of_two_sizes_and_text_only(pair):
    """A batch of two images of different sizes (left-padded) equals transformers on each row alone; text-only too."""
    hf, ours, _ = pair
    sizes = [(97, 45), (61, 150)]
    crops = [crops_for(s, seed=i) for i, s in enumerate(sizes)]
    counts = ours.image_token_counts(crops, sizes)
    ids, mask, _ = make_batch([(3, 1, 6), (7, 1, 2)], vocab=100, side="left")
    with torch.no_grad():
        out = ours(input_ids=ids, images=crops, image_sizes=sizes, attention_mask=mask)
        for b in range(2):
            hids, _ = hf_ids(ids[b : b + 1], [counts[b]], mask[b : b + 1])
            ref = hf(input_ids=hids, pixel_values=crops[b][None], image_sizes=torch.tensor([sizes[b][::-1]])).logits[0]
            got = out.logits[b][out.attention_mask[b]]
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
        text, _, _ = make_batch([(9, 0, 0)], vocab=100)
        torch.testing.assert_close(ours(input_ids=text).logits, hf(input_ids=text).logits, rtol=1e-4, atol=1e-4)


def test_untiled_multi_image_sample(pair):
    """Two images in one sample: one crop each (padded square), base tokens + one newline, as transformers does."""
    hf, ours, _ = pair
    sizes = [(97, 45), (50, 50)]
    crops = [torch.randn(1, 3, S, S), torch.randn(1, 3, S, S)]
    assert ours.image_token_counts(crops, sizes) == [10, 10]
    ids = torch.tensor([[5, 6, pmod.IMAGE_TOKEN_INDEX, 7, pmod.IMAGE_TOKEN_INDEX, 8, 9]])
    hids, _ = hf_ids(ids, [10, 10])
    with torch.no_grad():
        ref = hf(input_ids=hids, pixel_values=torch.stack(crops), image_sizes=torch.tensor([s[::-1] for s in sizes]),
                 batch_num_images=torch.tensor([2])).logits
        got = ours(input_ids=ids, images=crops, image_sizes=sizes).logits
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_greedy_generation_matches_transformers(pair):
    hf, ours, _ = pair
    size = (97, 45)
    crops = crops_for(size)
    n = ours.image_token_counts([crops], [size])[0]
    ids, _, _ = make_batch([(4, 1, 5)], vocab=100)
    hids, hmask = hf_ids(ids, [n])
    assert_greedy_matches(hf, ours, dict(input_ids=hids, attention_mask=hmask, pixel_values=crops[None],
                                         image_sizes=torch.tensor([size[::-1]])),
                          dict(input_ids=ids, images=[crops], image_sizes=[size]))


def test_tied_embeddings_load(tmp_path):
    tiny_onevision_hf(tmp_path, tie=True)
    ours = pmod.from_pretrained(tmp_path, dtype=torch.float32)
    assert ours.config.text.tie_word_embeddings and ours.lm_head.weight is ours.language_model.embed_tokens.weight


def test_unknown_key_is_an_error(tmp_path):
    from safetensors.torch import load_file, save_file

    tiny_onevision_hf(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["model.mystery.weight"] = torch.zeros(2)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(pmod.io.CheckpointError, match="mystery"):
        pmod.from_pretrained(tmp_path)


@pytest.mark.parametrize("max_crops", [9, 2, 1])
@pytest.mark.parametrize("size_wh", [(97, 45), (37, 101), (300, 41), (1000, 999), (7, 500)])
def test_token_count_equals_assembled_length(size_wh, max_crops):
    pins = [[w, h] for h, w in PINS_HW]
    gw, gh = grid_shape(size_wh, pins, S)
    feats = torch.randn(1 + gw * gh, 9, 5)
    out = assemble_onevision_features(feats, size_wh, pins, S, 3, torch.randn(5), max_crops)
    assert out.shape == (onevision_num_tokens(size_wh, pins, S, 3, max_crops), 5)


def test_unpad_rounds_as_onevision():
    # 47 * (6 / 94) = 2.9999999999999996 in floating point: OneVision keeps 3 rows, LLaVA-NeXT's int() 2 (+ odd surplus)
    from pmod.multimodal.anyres import unpad_shape

    assert 47 * (6 / 94) < 3
    top, bottom, left, right = onevision_unpad_bounds((6, 6), (94, 47))
    assert (bottom - top, right - left) == (4, 6)  # new_h = 3, pad = (6 - 3) // 2 = 1 from both ends
    assert unpad_shape((6, 6), (94, 47)) == (6 - 2 * 2, 6)


def test_parse_anyres_max():
    assert parse_anyres_max("anyres_max_9") == 9
    with pytest.raises(ValueError, match="anyres_max_N"):
        parse_anyres_max("anyres")


def test_crop_count_is_checked_before_the_tower(pair):
    _, ours, _ = pair
    ids, _, _ = make_batch([(2, 1, 2)], vocab=100)
    with pytest.raises(ValueError, match=r"takes 1 \+ 3x1 crops"):
        ours(input_ids=ids, images=[torch.randn(3, 3, S, S)], image_sizes=[(300, 41)])
