"""Qwen3-VL (transformers' `qwen3_vl`): q/k-normed Qwen3 decoder, interleaved M-RoPE, DeepStack, against transformers."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_batch
from test_qwen2_5_vl import hf_inputs  # the same token / pixel layout (2x2 merge, image token 150)
from vlm_common import assert_greedy_matches, assert_round_trip, randomize_and_save

import pmod
from pmod.config import ModConfig
from pmod.modeling.mrope import mrope_cos_sin, mrope_positions

IMG, VSTART, VEND = 150, 152, 153
M, P, T = 2, 16, 2
DP = 3 * T * P * P


def tiny_qwen3_hf(folder, seed=0):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    torch.manual_seed(seed)
    cfg = Qwen3VLConfig(
        text_config=dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "rope_theta": 5e5, "mrope_section": [2, 3, 3],
                                          "mrope_interleaved": True}),
        vision_config=dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=4, out_hidden_size=64, patch_size=P,
                           spatial_merge_size=M, temporal_patch_size=T, num_position_embeddings=64,
                           deepstack_visual_indexes=[0, 1]),
        image_token_id=IMG, video_token_id=151, vision_start_token_id=VSTART, vision_end_token_id=VEND)
    return randomize_and_save(Qwen3VLForConditionalGeneration(cfg).eval(), folder)


def pixels(gh, gw, seed=0):
    return torch.randn(1, gh, gw, M * M, DP, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen3")
    hf = tiny_qwen3_hf(folder)
    return hf, pmod.from_pretrained(folder, dtype=torch.float32), folder


def test_config_translated(pair):
    _, ours, _ = pair
    t = ours.config.text
    assert t.qk_norm and t.mrope_interleaved and not t.qkv_bias and t.head_dim == 16 and t.mrope_section == [2, 3, 3]
    assert ours.config.vision.backend == "qwen3_vl" and ours.config.conv_template == "qwen3_vl"


def test_interleaved_cos_sin_equal_transformers(pair):
    hf, ours, _ = pair
    pos = torch.randint(0, 50, (3, 1, 11))
    ref_cos, ref_sin = hf.model.language_model.rotary_emb(torch.zeros(1, 11, 64), pos)
    cos, sin = ours.language_model.rope(pos[:, 0], torch.float32)
    assert torch.equal(cos, ref_cos[0]) and torch.equal(sin, ref_sin[0])
    # and blocks (Qwen2-VL) differ from the interleaving: the test can tell them apart
    other, _ = mrope_cos_sin(pos[:, 0], ours.language_model._inv_freq[pos.device], [2, 3, 3], torch.float32)
    assert not torch.equal(other, cos)


@pytest.mark.parametrize("grid", [(3, 5), (1, 4), (4, 4)])
def test_logits_match_transformers(pair, grid):
    hf, ours, _ = pair
    img = pixels(*grid)
    ids, _, _ = make_batch([(4, 1, 5)], vocab=140)
    with torch.no_grad():
        ref = hf(**hf_inputs(ids, [img])).logits
        got = ours(input_ids=ids, images=[img]).logits
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_two_images_batch_and_text_only(pair):
    hf, ours, _ = pair
    imgs = [pixels(2, 3, 1), pixels(3, 2, 2)]
    ids = torch.tensor([[5, 6, VSTART, pmod.IMAGE_TOKEN_INDEX, VEND, 7, VSTART, pmod.IMAGE_TOKEN_INDEX, VEND, 8]])
    text, _, _ = make_batch([(9, 0, 0)], vocab=140)
    rows, mask, _ = make_batch([(3, 1, 6), (7, 1, 2)], vocab=140, side="left")
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids, images=imgs).logits, hf(**hf_inputs(ids, imgs)).logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours(input_ids=text).logits, hf(input_ids=text).logits, rtol=1e-4, atol=1e-4)
        out = ours(input_ids=rows, images=imgs, attention_mask=mask)
        for b in range(2):
            ref = hf(**hf_inputs(rows[b : b + 1, mask[b].bool()], imgs[b : b + 1])).logits[0]
            torch.testing.assert_close(out.logits[b][out.attention_mask[b]], ref, rtol=1e-4, atol=1e-4)


def test_greedy_generation_matches_transformers(pair):
    hf, ours, _ = pair
    img = pixels(3, 5)
    ids, _, _ = make_batch([(4, 1, 5)], vocab=140)
    assert_greedy_matches(hf, ours, hf_inputs(ids, [img]), dict(input_ids=ids, images=[img]))


def test_positions_equal_get_rope_index(pair):
    hf, _, _ = pair
    grids = [(1, 2, 3), (1, 4, 1)]
    imgs = [torch.zeros(*g, M * M, DP) for g in grids]
    ids = torch.tensor([[5, pmod.IMAGE_TOKEN_INDEX, 7, pmod.IMAGE_TOKEN_INDEX, 9]])
    kw = hf_inputs(ids, imgs)
    pos, nxt = mrope_positions(ids.numpy(), np.ones(ids.shape, bool), grids)
    ref, delta = hf.model.get_rope_index(kw["input_ids"], kw["mm_token_type_ids"], image_grid_thw=kw["image_grid_thw"])
    assert pos.tolist() == ref[:, 0].tolist() and nxt == [int(delta[0, 0]) + kw["input_ids"].shape[1]]


def test_pmod_conversion_exact_at_unit_ratios_and_routes_with_deepstack(pair):
    """DeepStack feeds layers 0-1 (dense under any default schedule); a MoD layer there still gets it on all vision
    tokens, kept or skipped (they stay in the residual stream)."""
    _, dense, folder = pair
    img = [pixels(3, 5)]
    ids, _, _ = make_batch([(4, 1, 5)], vocab=140)
    unit = pmod.from_pretrained(folder, dtype=torch.float32, mod=ModConfig(layer_ratios={1: 1.0, 2: 1.0, 3: 1.0}))
    routed = pmod.from_pretrained(folder, dtype=torch.float32, mod=ModConfig(layer_ratios={1: 0.5, 3: 0.3}))
    with torch.no_grad():
        for r in routed.language_model.routers.values():
            r.weight.normal_(0, 0.5)
        assert torch.equal(dense(input_ids=ids, images=img).logits, unit(input_ids=ids, images=img).logits)
        out = routed(input_ids=ids, images=img, use_cache=True)
    lens = out.past_key_values.layer_lengths()
    n_text = ids.shape[1] - 1
    assert list(lens) == [n_text + 15, n_text + 7, n_text + 15, n_text + 4]  # trunc(15 * 0.5), trunc(15 * 0.3)
    new = routed.generate(input_ids=ids, images=img, max_new_tokens=5, eos_token_id=[])
    with torch.no_grad():
        ref = routed(input_ids=torch.cat([ids, new], 1), images=img).logits[0]
    assert torch.equal(ref[-6:-1].argmax(-1), new[0])


def test_processor_matches_transformers(tmp_path):
    """Qwen2-VL's image pipeline at Qwen3-VL's settings (patch 16, 0.5 normalisation), against Qwen3VLProcessor."""
    from PIL import Image
    from test_qwen2_5_vl_processor import collapse, qwen_tokenizer
    from transformers import Qwen3VLProcessor, Qwen3VLVideoProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tiny_qwen3_hf(tmp_path)
    ip = Qwen2VLImageProcessorPil(patch_size=16, image_mean=[0.5] * 3, image_std=[0.5] * 3, min_pixels=32 * 32 * 4,
                                  max_pixels=32 * 32 * 30)
    ip.save_pretrained(tmp_path)
    tok = qwen_tokenizer()
    theirs = Qwen3VLProcessor(image_processor=ip, tokenizer=tok, video_processor=Qwen3VLVideoProcessor())
    ours = pmod.PmodProcessor(tok, pmod.load_config(tmp_path))
    assert ours.config.vision.image_mean == (0.5, 0.5, 0.5) and ours.config.vision.max_pixels == 32 * 32 * 30
    for w, h in [(97, 45), (500, 333), (20, 30)]:
        img = Image.fromarray(np.random.default_rng(w).integers(0, 256, (h, w, 3), dtype=np.uint8))
        q = "<|im_start|>user\n<|vision_start|>{}<|vision_end|>what is in this image ?<|im_end|>\n<|im_start|>assistant\n"
        ref = theirs(text=q.format("<|image_pad|>"), images=[img], return_tensors="pt")
        got = ours(q.format("<image>"), [img], chat=False)
        (t, gh, gw), = ref["image_grid_thw"].tolist()
        assert [tuple(x.shape[:3]) for x in got["images"]] == [(1, gh // 2, gw // 2)]
        assert got["input_ids"][0].tolist() == collapse(ref["input_ids"][0].tolist(), [gh * gw // 4])
        assert torch.equal(got["images"][0].reshape(-1, DP), ref["pixel_values"])


def test_last_layer_mod_equals_transformers_layer_on_the_kept_tokens(pair):
    """Kept vision tokens keep their interleaved 3-D positions (q/k norm, DeepStack before: the full reference)."""
    from test_qwen2_5_vl_mod import check_last_layer_against_transformers

    hf, _, folder = pair
    ours = pmod.from_pretrained(folder, dtype=torch.float32, mod=ModConfig(layer_ratios={3: 0.4}))
    with torch.no_grad():
        ours.language_model.routers["3"].weight.normal_(0, 0.5)
        ours.language_model.routers["3"].bias.fill_(0.1)
    img = pixels(3, 5)
    ids, _, _ = make_batch([(4, 1, 5)], vocab=140)
    with torch.no_grad():
        got = ours(input_ids=ids, images=[img]).logits[0]
        ref = check_last_layer_against_transformers(hf, ours, hf_inputs(ids, [img]))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_save_pretrained_round_trip(pair, tmp_path):
    _, _, folder = pair
    model = pmod.from_pretrained(folder, dtype=torch.float32, mod=ModConfig(layer_ratios={2: 0.5, 3: 0.3}))
    with torch.no_grad():
        for r in model.language_model.routers.values():
            r.weight.normal_(0, 0.5)
    ids, _, _ = make_batch([(4, 1, 5)], vocab=140)
    assert_round_trip(model, tmp_path, input_ids=ids, images=[pixels(4, 3)])
