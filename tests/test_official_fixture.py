"""Our loader and model against the official p-MoD code's outputs on its tiny checkpoint."""
from __future__ import annotations

import re

import pytest
import torch
from conftest import official_anyres_checkpoint
from safetensors.torch import load_file

import pmod


@pytest.fixture(scope="module")
def model(official_dir):
    return pmod.from_pretrained(official_dir / "checkpoint", dtype=torch.float32)


@pytest.fixture(scope="module")
def pixels(official_dir):
    return load_file(official_dir / "preprocess.safetensors")["pixel_values"]


def test_config_translation(model):
    cfg = model.config
    assert sorted(cfg.mod_ratios) == list(range(8, 32))
    assert cfg.mod.norm == "tanh" and cfg.mod.norm_scale == 0.2 and cfg.mod.norm_bias == 1.0
    assert cfg.text.num_key_value_heads == 2 and cfg.vision.num_patches == 25


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_prefill_logits_routing_and_kv(model, pixels, official_dir, backend):
    ref = load_file(official_dir / "prefill.safetensors")
    model.attn_backend = backend
    try:
        with torch.no_grad():
            out = model(input_ids=ref["input_ids"], images=pixels[ref["image_index"]], use_cache=True)
    finally:
        model.attn_backend = "auto"
    assert out.logits.shape == ref["logits"].shape
    assert (out.logits - ref["logits"]).abs().max() <= 1e-4
    assert torch.equal(out.vision_mask, ref["mod_target_mask"])
    assert out.past_key_values.layer_lengths() == ref["kv_cache_lengths"].tolist()
    assert [r.layer for r in out.routing] == list(range(8, 32))
    for rec in out.routing:
        assert torch.equal(rec.kept[0], ref[f"kept_vision_positions.L{rec.layer}"]), rec.layer
    # The router weights we report are TanhNorm of the official raw router outputs.
    vis = ref["mod_target_mask"][0]
    for rec in out.routing:
        expected = 0.2 * torch.tanh(ref[f"router_logits.L{rec.layer}"]) + 1
        torch.testing.assert_close(rec.weights[0, vis], expected, rtol=1e-5, atol=1e-5)


def test_training_loss_and_gradients(official_dir, pixels):
    model = pmod.from_pretrained(official_dir / "checkpoint", dtype=torch.float32).train()
    ref = load_file(official_dir / "train.safetensors")
    out = model(input_ids=ref["input_ids"], images=pixels[ref["image_index"]], attention_mask=ref["attention_mask"], labels=ref["labels"])
    assert torch.equal(out.attention_mask, ref["merged_attention_mask"])
    assert torch.equal(out.vision_mask, ref["merged_mod_target_mask"])
    assert abs(out.loss.item() - ref["loss"].item()) <= 1e-4
    out.loss.backward()

    params = dict(model.named_parameters())
    grads = {k[5:]: v for k, v in ref.items() if k.startswith("grad.")}
    router_scale = max(v.abs().max().item() for k, v in grads.items() if ".router." in k)
    for key, g_ref in grads.items():
        m = re.fullmatch(r"model\.layers\.(\d+)\.router\.router\.(weight|bias)", key)
        ours = f"language_model.routers.{m[1]}.{m[2]}" if m else key.replace("model.mm_projector", "projector")
        g = params[ours].grad
        scale = router_scale if m else g_ref.abs().max().item()
        # relative error 1e-4, measured against the largest gradient of its kind (the last layers' are ~0)
        assert (g - g_ref).abs().max().item() <= 1e-4 * scale, key
    assert params["language_model.routers.31.weight"].grad.abs().max() == 0  # no supervised token follows


def test_generate_matches_official(model, pixels, official_dir):
    ref = load_file(official_dir / "generate.safetensors")
    tokens = model.generate(input_ids=ref["input_ids"], images=pixels[ref["image_index"]], max_new_tokens=8, do_sample=False)
    assert tokens[0].tolist() == ref["new_tokens"].tolist()


def test_anyres_prefill(official_dir, tmp_path):
    """LLaVA-NeXT anyres + spatial_unpad: same weights plus image_newline, one non-square image."""
    ck = official_anyres_checkpoint(official_dir, tmp_path)
    model = pmod.from_pretrained(ck)
    ref = load_file(official_dir / "anyres.safetensors")
    sizes = ref["image_sizes_wh"].tolist()
    assert model.image_token_counts(ref["images"], sizes) == [70]
    with torch.no_grad():
        out = model(input_ids=ref["input_ids"], images=ref["images"], image_sizes=sizes, use_cache=True)
    assert (out.logits - ref["logits"]).abs().max() <= 1e-4
    assert torch.equal(out.vision_mask, ref["mod_target_mask"])
    assert out.past_key_values.layer_lengths() == ref["kv_cache_lengths"].tolist()
    for rec in out.routing:
        assert torch.equal(rec.kept[0], ref[f"kept_vision_positions.L{rec.layer}"]), rec.layer


def test_generate_step_logits_and_cache_growth(model, pixels, official_dir):
    ref = load_file(official_dir / "generate.safetensors")
    ids, imgs = ref["input_ids"], pixels[ref["image_index"]]
    with torch.no_grad():
        out = model(input_ids=ids, images=imgs, use_cache=True, logits_to_keep="last")
        cache, logits = out.past_key_values, out.logits
        lengths = [cache.layer_lengths()]
        for step, tok in enumerate(ref["new_tokens"].tolist()):
            assert (logits[0] - ref["step_logits"][step]).abs().max() <= 1e-4, step
            if step + 1 < len(ref["new_tokens"]):
                logits = model.decode_step(torch.tensor([tok]), cache)
                lengths.append(cache.layer_lengths())
    assert lengths == ref["kv_cache_lengths_per_step"].tolist()
