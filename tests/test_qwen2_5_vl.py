"""Qwen2.5-VL (transformers' `qwen2_5_vl`) loaded from its own save_pretrained, against its own forward and M-RoPE."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_batch
from vlm_common import assert_greedy_matches, randomize_and_save

import pmod
from pmod.modeling.mrope import mrope_positions

IMG, VID, VSTART, VEND = 150, 151, 152, 153
M, P, T = 2, 14, 2  # merge, patch, temporal patch
DP = 3 * T * P * P  # values per patch


def tiny_qwen_hf(folder, tie=False, seed=0):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-6, tie_word_embeddings=tie,
                         bos_token_id=None, eos_token_id=None, rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                                                "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=4, out_hidden_size=64, patch_size=P,
                           spatial_merge_size=M, temporal_patch_size=T, window_size=56, fullatt_block_indexes=[1]),
        image_token_id=IMG, video_token_id=VID, vision_start_token_id=VSTART, vision_end_token_id=VEND, tie_word_embeddings=tie)
    return randomize_and_save(Qwen2_5_VLForConditionalGeneration(cfg).eval(), folder)


def pixels(gh, gw, seed=0):
    """One image as our model takes it: [1, gh, gw, m*m, Dp]."""
    return torch.randn(1, gh, gw, M * M, DP, generator=torch.Generator().manual_seed(seed))


def hf_inputs(ids: torch.Tensor, imgs: list[torch.Tensor]):
    """Our row (one -200 per image, no padding) -> transformers' input_ids, mm_token_type_ids, pixel_values, grid.
    Images are [1, gh, gw, M*M, values per patch] (Qwen2.5-VL and Qwen3-VL alike: both merge 2x2, image token 150)."""
    out, it = [], iter(imgs)
    for t in ids[0].tolist():
        out += [IMG] * int(np.prod(next(it).shape[:3])) if t == pmod.IMAGE_TOKEN_INDEX else [t]
    hids = torch.tensor([out])
    kw = {"input_ids": hids, "attention_mask": torch.ones_like(hids), "mm_token_type_ids": (hids == IMG).int()}
    if imgs:
        kw["pixel_values"] = torch.cat([x.reshape(-1, x.shape[-1]) for x in imgs])  # [patches, values per patch]
        kw["image_grid_thw"] = torch.tensor([[x.shape[0], x.shape[1] * M, x.shape[2] * M] for x in imgs])
    return kw


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen")
    hf = tiny_qwen_hf(folder)
    return hf, pmod.from_pretrained(folder, dtype=torch.float32), folder


def test_config_translated(pair):
    _, ours, _ = pair
    c = ours.config
    assert c.text.mrope_section == [2, 3, 3] and c.text.qkv_bias and not c.text.o_bias and c.text.rope_theta == 1e6
    assert c.vision.backend == "qwen2_5_vl" and c.projector_type == "none" and c.image_aspect_ratio == "native"
    assert c.conv_template == "qwen2_vl" and c.is_dense


@pytest.mark.parametrize("grid", [(3, 5), (4, 2), (1, 7), (5, 5)])
def test_logits_match_transformers(pair, grid):
    hf, ours, _ = pair
    img = pixels(*grid)
    ids, _, _ = make_batch([(4, 1, 5)], vocab=140)
    with torch.no_grad():
        ref = hf(**hf_inputs(ids, [img])).logits
        got = ours(input_ids=ids, images=[img]).logits
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_two_images_in_one_row_and_text_only(pair):
    hf, ours, _ = pair
    imgs = [pixels(2, 3, 1), pixels(4, 1, 2)]
    ids = torch.tensor([[5, 6, VSTART, pmod.IMAGE_TOKEN_INDEX, VEND, 7, VSTART, pmod.IMAGE_TOKEN_INDEX, VEND, 8, 9]])
    text, _, _ = make_batch([(9, 0, 0)], vocab=140)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids, images=imgs).logits, hf(**hf_inputs(ids, imgs)).logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours(input_ids=text).logits, hf(input_ids=text).logits, rtol=1e-4, atol=1e-4)


def test_batch_of_two_grids_left_padded(pair):
    hf, ours, _ = pair
    imgs = [pixels(3, 5, 3), pixels(2, 2, 4)]
    ids, mask, _ = make_batch([(3, 1, 6), (7, 1, 2)], vocab=140, side="left")
    with torch.no_grad():
        out = ours(input_ids=ids, images=imgs, attention_mask=mask)
        for b in range(2):
            ref = hf(**hf_inputs(ids[b : b + 1, mask[b].bool()], imgs[b : b + 1])).logits[0]
            torch.testing.assert_close(out.logits[b][out.attention_mask[b]], ref, rtol=1e-4, atol=1e-4)


def test_greedy_generation_matches_transformers(pair):
    """16 new tokens: decode positions continue after the image's largest position, as transformers' rope_deltas."""
    hf, ours, _ = pair
    img = pixels(3, 5)
    ids, _, _ = make_batch([(4, 1, 5)], vocab=140)
    assert_greedy_matches(hf, ours, hf_inputs(ids, [img]), dict(input_ids=ids, images=[img]))


@pytest.mark.parametrize("grids", [[(1, 3, 5)], [(1, 2, 3), (1, 4, 1)], []])
def test_positions_equal_get_rope_index(pair, grids):
    hf, _, _ = pair
    imgs = [torch.zeros(*g, M * M, DP) for g in grids]
    seq = [5, 6] + [t for _ in grids for t in (pmod.IMAGE_TOKEN_INDEX, 7, 8)] + [9]
    ids = torch.tensor([seq])
    kw = hf_inputs(ids, imgs) if grids else {"input_ids": ids, "mm_token_type_ids": torch.zeros_like(ids)}
    pos, nxt = mrope_positions(ids.numpy(), np.ones(ids.shape, bool), grids)
    if grids:
        ref, delta = hf.model.get_rope_index(kw["input_ids"], kw["mm_token_type_ids"], image_grid_thw=kw["image_grid_thw"])
        assert pos.tolist() == ref[:, 0].tolist() and nxt == [int(delta[0, 0]) + kw["input_ids"].shape[1]]
    else:
        assert pos.tolist() == [list(range(len(seq)))] * 3 and nxt == [len(seq)]


def test_tied_and_unknown_keys(tmp_path):
    from safetensors.torch import load_file, save_file

    tiny_qwen_hf(tmp_path / "tied", tie=True)
    ours = pmod.from_pretrained(tmp_path / "tied")
    assert ours.lm_head.weight is ours.language_model.embed_tokens.weight
    tiny_qwen_hf(tmp_path / "x")
    state = load_file(tmp_path / "x" / "model.safetensors")
    state["visual.mystery"] = torch.zeros(1)
    save_file(state, tmp_path / "x" / "model.safetensors")
    with pytest.raises(pmod.io.CheckpointError, match="visual.mystery"):
        pmod.from_pretrained(tmp_path / "x")


def test_bad_pixels_are_named(pair):
    _, ours, _ = pair
    ids, _, _ = make_batch([(2, 1, 2)], vocab=140)
    with pytest.raises(ValueError, match=r"\[gt, gh, gw, 4, 1176\]"):
        ours(input_ids=ids, images=[torch.randn(3, 5, 1176)])


def test_continuing_a_cache_equals_the_whole_row(pair):
    """M-RoPE positions continue across a chunk (every axis shifts by the prefix's next position): a text chunk and a
    chunk with a second image give the logits of the whole row from scratch, and the same greedy tokens."""
    _, ours, _ = pair
    X = pmod.IMAGE_TOKEN_INDEX
    imgs = [pixels(2, 3, 5), pixels(4, 1, 6)]
    prefix = [5, 6, VSTART, X, VEND, 7]
    for chunk, im in (([8, 9, 10], []), ([11, VSTART, X, VEND, 12, 13], imgs[1:])):
        whole = torch.tensor([prefix + chunk])
        with torch.no_grad():
            cache = ours(input_ids=torch.tensor([prefix]), images=imgs[:1], use_cache=True).past_key_values
            ref = ours(input_ids=whole, images=imgs[:1] + im).logits[0]
            got = ours(input_ids=torch.tensor([chunk]), images=im or None, past_key_values=cache.copy()).logits[0]
        torch.testing.assert_close(got, ref[-got.shape[0]:], rtol=0, atol=1e-5)
        want = ours.generate(input_ids=whole, images=imgs[:1] + im, max_new_tokens=6, eos_token_id=[])
        assert torch.equal(ours.generate(input_ids=torch.tensor([chunk]), images=im or None, past_key_values=cache,
                                         max_new_tokens=6, eos_token_id=[]), want)
