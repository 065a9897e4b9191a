"""Loading dense LLaVA checkpoints (original and llava-hf layouts) and converting them to p-MoD."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import make_batch, tiny_model
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
from vlm_common import randomize_and_save

import pmod
from pmod.config import ModConfig

IMG_TOKEN = 96  # the llava-hf tokenizer's <image> id in these tiny models


def tiny_llava_hf(tmp_path, seed=0):
    torch.manual_seed(seed)
    tc = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5)
    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, image_size=42, patch_size=14)
    hf = LlavaForConditionalGeneration(LlavaConfig(text_config=tc, vision_config=vc, image_token_index=IMG_TOKEN)).eval()
    return randomize_and_save(hf, tmp_path)


def hf_ids(ids: torch.Tensor, n_feat: int) -> torch.Tensor:
    """Our single -200 placeholder -> llava-hf's n_feat repeated image tokens."""
    rows = []
    for r in ids.tolist():
        out = []
        for t in r:
            out += [IMG_TOKEN] * n_feat if t == pmod.IMAGE_TOKEN_INDEX else [t]
        rows.append(out)
    return torch.tensor(rows)


def test_llava_hf_matches_transformers(tmp_path):
    hf = tiny_llava_hf(tmp_path)
    ours = pmod.from_pretrained(tmp_path, dtype=torch.float32)
    assert ours.config.is_dense and ours.config.vision.num_patches == 9
    ids, _, n = make_batch([(4, 1, 6)])
    pix = torch.randn(n, 3, 42, 42)
    with torch.no_grad():
        ref = hf(input_ids=hf_ids(ids, 9), pixel_values=pix).logits
        got = ours(input_ids=ids, images=pix).logits
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_llava_hf_converted_to_pmod_with_unit_ratios_is_exact(tmp_path):
    tiny_llava_hf(tmp_path)
    dense = pmod.from_pretrained(tmp_path)
    conv = pmod.from_pretrained(tmp_path, mod=ModConfig(layer_ratios={1: 1.0, 2: 1.0, 3: 1.0}))
    assert sorted(conv.language_model.routers) == ["1", "2", "3"]
    assert all((r.weight == 0).all() and (r.bias == 0).all() for r in conv.language_model.routers.values())
    ids, _, n = make_batch([(4, 1, 6)])
    pix = torch.randn(n, 3, 42, 42)
    with torch.no_grad():
        torch.testing.assert_close(conv(input_ids=ids, images=pix).logits, dense(input_ids=ids, images=pix).logits, rtol=0, atol=1e-6)


def test_llava_hf_converted_with_default_schedule_routes(tmp_path):
    tiny_llava_hf(tmp_path)
    conv = pmod.from_pretrained(tmp_path, mod=ModConfig())
    ids, _, n = make_batch([(4, 1, 6)])
    out = conv(input_ids=ids, images=torch.randn(n, 3, 42, 42))
    assert [r.layer for r in out.routing] == sorted(conv.config.mod_ratios) and out.routing
    # zero routers: w = 1 on every vision token
    assert torch.equal(out.routing[0].weights[out.vision_mask], torch.ones(9))


def write_original_llava(model, folder):
    """Write `model` (dense) in the original LLaVA layout: llava_llama config, tower weights beside it."""
    folder.mkdir()
    t, v = model.config.text, model.config.vision
    (folder / "tower").mkdir()
    (folder / "tower" / "config.json").write_text(json.dumps({"model_type": "clip_vision_model", **v.clip}))
    sd = model.state_dict()
    save_file({k.replace("vision_tower.model.", "vision_model."): x for k, x in sd.items() if k.startswith("vision_tower.")},
              folder / "tower" / "model.safetensors")
    cfg = {"model_type": "llava_llama", "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
           "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_hidden_layers,
           "num_attention_heads": t.num_attention_heads, "num_key_value_heads": t.num_key_value_heads,
           "rms_norm_eps": t.rms_norm_eps, "max_position_embeddings": t.max_position_embeddings,
           "mm_vision_tower": "tower", "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2,
           "mm_vision_select_feature": "patch", "image_aspect_ratio": "pad", "mm_patch_merge_type": "flat",
           "tokenizer_model_max_length": 512, "mm_hidden_size": 32, "use_mm_proj": True}
    (folder / "config.json").write_text(json.dumps(cfg))
    llm = {}
    for k, x in sd.items():
        if k.startswith("language_model.layers."):
            llm["model." + k[len("language_model."):]] = x
        elif k.startswith("language_model."):
            llm["model." + k[len("language_model."):]] = x
        elif k.startswith("projector."):
            llm["model.mm_projector." + k[len("projector."):]] = x
        elif k == "lm_head.weight":
            llm[k] = x
    save_file(llm, folder / "model.safetensors")  # vision tower NOT saved (frozen during LLaVA training)


def test_original_llava_layout_loads_tower_from_its_folder(tmp_path):
    model = tiny_model(schedule="none")
    write_original_llava(model, tmp_path / "llava")
    again = pmod.from_pretrained(tmp_path / "llava")
    ids, _, n = make_batch([(4, 1, 6)])
    pix = torch.randn(n, 3, 42, 42)
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids, images=pix).logits, model(input_ids=ids, images=pix).logits)


def test_pmod_rescheduled_to_dense_drops_routers(official_dir):
    dense = pmod.from_pretrained(official_dir / "checkpoint", mod=ModConfig(schedule="none"))
    assert len(dense.language_model.routers) == 0 and dense.config.is_dense


def test_missing_vision_tower_is_a_clear_error(tmp_path):
    model = tiny_model(schedule="none")
    write_original_llava(model, tmp_path / "llava")
    cfg = json.loads((tmp_path / "llava" / "config.json").read_text())
    cfg["mm_vision_tower"] = "no-such-tower"
    (tmp_path / "llava" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FileNotFoundError, match="vision tower 'no-such-tower' not found"):
        pmod.from_pretrained(tmp_path / "llava")


def test_llava_next_hf_matches_transformers(tmp_path):
    """anyres + spatial_unpad + image_newline against transformers' LlavaNextForConditionalGeneration."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    torch.manual_seed(0)
    tc = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5)
    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, image_size=42, patch_size=14)
    pinpoints = [[42, 84], [84, 42], [84, 84]]
    hf = LlavaNextForConditionalGeneration(LlavaNextConfig(text_config=tc, vision_config=vc, image_token_index=IMG_TOKEN,
                                                           image_grid_pinpoints=pinpoints)).eval()
    randomize_and_save(hf, tmp_path)
    ours = pmod.from_pretrained(tmp_path, dtype=torch.float32)
    assert ours.config.image_aspect_ratio == "anyres" and ours.config.uses_image_newline
    from pmod.multimodal.anyres import grid_shape

    w, h = 90, 40  # wider than tall: unpadding drops rows
    gw, gh = grid_shape((w, h), pinpoints, 42)
    crops = torch.randn(1, 1 + gw * gh, 3, 42, 42)  # base + crops
    n_feat = ours.image_token_counts(crops, [(w, h)])[0]
    ids, _, _ = make_batch([(4, 1, 5)])
    with torch.no_grad():
        ref = hf(input_ids=hf_ids(ids, n_feat), pixel_values=crops, image_sizes=torch.tensor([[h, w]])).logits
        got = ours(input_ids=ids, images=crops, image_sizes=[(w, h)]).logits
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
