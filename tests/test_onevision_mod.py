"""p-MoD on LLaVA-OneVision: conversion, kept counts and KV lengths, batching, gradients, training, round trip."""
from __future__ import annotations

import pytest
import torch
import vlm_common
from conftest import make_batch
from test_onevision import crops_for, tiny_onevision_hf

import pmod
from pmod.config import ModConfig

RATIOS = {1: 0.6, 2: 0.45, 3: 0.3}
SIZES = [(97, 45), (61, 150), (130, 129)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    f = tmp_path_factory.mktemp("ovmod")
    tiny_onevision_hf(f, aspect="anyres_max_1")  # small maps get shrunk too: every path of the layout
    return f


def routed(folder, seed=0):
    return vlm_common.routed(folder, RATIOS, seed)


def trunc_k(n: int, ratio: float) -> int:
    """k as the official code computes it: an int32 count times a Python float (float32), truncated."""
    return int(torch.tensor(n, dtype=torch.int32) * ratio)


def test_unit_ratios_equal_dense_exactly(folder):
    dense = pmod.from_pretrained(folder, dtype=torch.float32)
    conv = pmod.from_pretrained(folder, dtype=torch.float32, mod=ModConfig(layer_ratios={1: 1.0, 2: 1.0, 3: 1.0}))
    assert all((r.weight == 0).all() and (r.bias == 0).all() for r in conv.language_model.routers.values())
    crops = [crops_for(SIZES[0])]
    ids, _, _ = make_batch([(4, 1, 5)], vocab=100)
    with torch.no_grad():
        a = dense(input_ids=ids, images=crops, image_sizes=SIZES[:1]).logits
        b = conv(input_ids=ids, images=crops, image_sizes=SIZES[:1]).logits
    assert torch.equal(a, b)


def test_kv_length_is_text_plus_trunc_of_vision(folder):
    model = routed(folder)
    crops = [crops_for(s, seed=i) for i, s in enumerate(SIZES[:2])]
    counts = model.image_token_counts(crops, SIZES[:2])
    ids, mask, _ = make_batch([(3, 1, 6), (7, 1, 2)], vocab=100, side="left")
    with torch.no_grad():
        out = model(input_ids=ids, images=crops, image_sizes=SIZES[:2], attention_mask=mask, use_cache=True)
    lens = out.past_key_values.layer_lengths()  # [L, B]
    n_text = (mask.sum(1) - 1).tolist()  # one placeholder per row
    for layer in range(4):
        for b in range(2):
            want = n_text[b] + (trunc_k(counts[b], RATIOS[layer]) if layer in RATIOS else counts[b])
            assert int(lens[layer, b]) == want, (layer, b)
    for rec in out.routing:  # the kept ones are vision tokens, ascending
        for b in range(2):
            kept = rec.kept[b][rec.kept[b] >= 0]
            assert out.vision_mask[b, kept].all() and (kept.diff() > 0).all()


def test_batched_equals_one_by_one_and_generation(folder):
    model = routed(folder)
    crops = [crops_for(s, seed=i) for i, s in enumerate(SIZES)]
    rows = [(3, 1, 6), (7, 1, 2), (2, 1, 4)]
    ids, mask, _ = make_batch(rows, vocab=100, side="left")
    with torch.no_grad():
        out = model(input_ids=ids, images=crops, image_sizes=SIZES, attention_mask=mask)
    batch_new = model.generate(input_ids=ids, images=crops, image_sizes=SIZES, attention_mask=mask, max_new_tokens=6,
                               eos_token_id=[])
    for b in range(3):
        real = mask[b].bool()
        with torch.no_grad():
            one = model(input_ids=ids[b : b + 1, real], images=crops[b : b + 1], image_sizes=SIZES[b : b + 1])
        torch.testing.assert_close(out.logits[b][out.attention_mask[b]], one.logits[0], rtol=1e-5, atol=1e-5)
        new = model.generate(input_ids=ids[b : b + 1, real], images=crops[b : b + 1], image_sizes=SIZES[b : b + 1],
                             max_new_tokens=6, eos_token_id=[])
        assert torch.equal(batch_new[b], new[0])
        # decoding from the reduced cache = the argmax of recomputing the whole sequence
        full = torch.cat([ids[b : b + 1, real], new], 1)
        with torch.no_grad():
            ref = model(input_ids=full, images=crops[b : b + 1], image_sizes=SIZES[b : b + 1]).logits[0]
        assert torch.equal(ref[-7:-1].argmax(-1), new[0])


def test_routers_get_gradients_and_training_lowers_the_loss(folder):
    model = routed(folder).train()
    crops = [crops_for(s, seed=i) for i, s in enumerate(SIZES[:2])]
    ids, mask, _ = make_batch([(3, 1, 6), (4, 1, 5)], vocab=100)
    labels = ids.masked_fill(mask == 0, -100).masked_fill(ids < 0, -100)
    for p in model.vision_tower.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for step in range(8):
        loss = model(input_ids=ids, images=crops, image_sizes=SIZES[:2], attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        if step == 0:
            assert all(r.weight.grad.abs().sum() > 0 for r in model.language_model.routers.values())
            assert model.image_newline.grad.abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_save_pretrained_round_trip(folder, tmp_path):
    model = routed(folder)
    model.save_pretrained(tmp_path)
    again = pmod.from_pretrained(tmp_path, dtype=torch.float32)
    assert again.config == model.config and again.config.anyres_max_crops == 1
    crops = [crops_for(SIZES[2])]
    ids, _, _ = make_batch([(4, 1, 5)], vocab=100)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, images=crops, image_sizes=SIZES[2:]).logits,
                           again(input_ids=ids, images=crops, image_sizes=SIZES[2:]).logits)
