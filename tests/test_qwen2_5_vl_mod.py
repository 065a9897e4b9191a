"""p-MoD on Qwen2.5-VL: kept tokens keep their 3-D positions (checked against transformers' own layer), conversion,
KV lengths, batching, decoding, gradients, training and the save round trip."""
from __future__ import annotations

import pytest
import torch
import vlm_common
from conftest import make_batch
from test_qwen2_5_vl import hf_inputs, pixels, tiny_qwen_hf
from vlm_common import assert_round_trip

import pmod
from pmod.config import ModConfig

RATIOS = {1: 0.6, 2: 0.45, 3: 0.3}
GRIDS = [(3, 5), (2, 2), (4, 3)]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    f = tmp_path_factory.mktemp("qwenmod")
    return tiny_qwen_hf(f), f


def routed(folder, ratios=RATIOS, seed=0):
    return vlm_common.routed(folder, ratios, seed)


def check_last_layer_against_transformers(hf, ours, kw, img_token=150):
    """Reference built from transformers' modules: layers 0..L-2 as they are, then the last layer (MoD at ratio 0.4)
    run on text + the top-k vision tokens at their get_rope_index (t, h, w) positions, merged by STRing."""
    lm = hf.model.language_model
    last = len(lm.layers) - 1
    h = hf.model(**kw, output_hidden_states=True).hidden_states[last][0]  # [N, C], the input of the last layer
    pos, _ = hf.model.get_rope_index(kw["input_ids"], kw["mm_token_type_ids"], image_grid_thw=kw["image_grid_thw"])
    vision = (kw["input_ids"][0] == img_token).nonzero().flatten()
    router = ours.language_model.routers[str(last)]
    w = 0.2 * torch.tanh(h @ router.weight[0] + router.bias[0]) + 1  # TanhNorm, [N]
    k = int(torch.tensor(len(vision), dtype=torch.int32) * 0.4)
    keep = torch.ones(len(h), dtype=torch.bool)
    keep[vision] = False
    keep[vision[w[vision].topk(k).indices]] = True
    idx = keep.nonzero().flatten()  # [Nk], sequence order
    cos, sin = lm.rotary_emb(h[None], pos[:, :, idx])
    causal = torch.full((len(idx), len(idx)), float("-inf")).triu(1)[None, None]
    layer = lm.layers[last]
    hk = h[idx][None]
    h_mid = hk + layer.self_attn(layer.input_layernorm(hk), attention_mask=causal, position_embeddings=(cos, sin))[0]
    m = layer.mlp(layer.post_attention_layernorm(h_mid))[0]
    is_vis = torch.zeros(len(h), dtype=torch.bool)
    is_vis[vision] = True
    out = w[:, None] * h  # skipped vision tokens: w * h
    out[idx] = h_mid[0] + torch.where(is_vis[idx, None], w[idx, None], 1.0) * m  # kept: h_mid + w*m; text: h_mid + m
    return hf.lm_head(lm.norm(out))


def test_last_layer_mod_equals_transformers_layer_on_the_kept_tokens(pair):
    hf, folder = pair
    ours = routed(folder, ratios={3: 0.4})
    img = pixels(3, 5)
    ids, _, _ = make_batch([(4, 1, 5)], vocab=140)
    with torch.no_grad():
        got = ours(input_ids=ids, images=[img]).logits[0]
        ref = check_last_layer_against_transformers(hf, ours, hf_inputs(ids, [img]))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_unit_ratios_equal_dense_exactly(pair):
    _, folder = pair
    dense = pmod.from_pretrained(folder, dtype=torch.float32)
    conv = pmod.from_pretrained(folder, dtype=torch.float32, mod=ModConfig(layer_ratios={1: 1.0, 2: 1.0, 3: 1.0}))
    img = [pixels(3, 5)]
    ids, _, _ = make_batch([(4, 1, 5)], vocab=140)
    with torch.no_grad():
        assert torch.equal(dense(input_ids=ids, images=img).logits, conv(input_ids=ids, images=img).logits)


def test_kv_length_is_text_plus_trunc_of_vision(pair):
    _, folder = pair
    model = routed(folder)
    imgs = [pixels(*g, seed=i) for i, g in enumerate(GRIDS[:2])]
    ids, mask, _ = make_batch([(3, 1, 6), (7, 1, 2)], vocab=140, side="left")
    with torch.no_grad():
        out = model(input_ids=ids, images=imgs, attention_mask=mask, use_cache=True)
    lens = out.past_key_values.layer_lengths()
    n_text = (mask.sum(1) - 1).tolist()
    for layer in range(4):
        for b, (gh, gw) in enumerate(GRIDS[:2]):
            n_v = gh * gw
            want = n_text[b] + (int(torch.tensor(n_v, dtype=torch.int32) * RATIOS[layer]) if layer in RATIOS else n_v)
            assert int(lens[layer, b]) == want, (layer, b)


def test_batched_equals_one_by_one_and_decoding(pair):
    _, folder = pair
    model = routed(folder)
    imgs = [pixels(*g, seed=i) for i, g in enumerate(GRIDS)]
    ids, mask, _ = make_batch([(3, 1, 6), (7, 1, 2), (2, 1, 4)], vocab=140, side="left")
    with torch.no_grad():
        out = model(input_ids=ids, images=imgs, attention_mask=mask)
    batch_new = model.generate(input_ids=ids, images=imgs, attention_mask=mask, max_new_tokens=6, eos_token_id=[])
    for b in range(3):
        row = ids[b : b + 1, mask[b].bool()]
        with torch.no_grad():
            one = model(input_ids=row, images=imgs[b : b + 1])
        torch.testing.assert_close(out.logits[b][out.attention_mask[b]], one.logits[0], rtol=1e-5, atol=1e-5)
        new = model.generate(input_ids=row, images=imgs[b : b + 1], max_new_tokens=6, eos_token_id=[])
        assert torch.equal(batch_new[b], new[0])
        with torch.no_grad():  # decoding from the reduced cache at the continued M-RoPE positions = recomputing
            ref = model(input_ids=torch.cat([row, new], 1), images=imgs[b : b + 1]).logits[0]
        assert torch.equal(ref[-7:-1].argmax(-1), new[0])


def test_routers_get_gradients_and_training_lowers_the_loss(pair):
    _, folder = pair
    model = routed(folder).train()
    imgs = [pixels(*g, seed=i) for i, g in enumerate(GRIDS[:2])]
    ids, mask, _ = make_batch([(3, 1, 6), (4, 1, 5)], vocab=140)
    labels = ids.masked_fill(mask == 0, -100).masked_fill(ids < 0, -100)
    for p in model.vision_tower.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for step in range(8):
        loss = model(input_ids=ids, images=imgs, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        if step == 0:
            assert all(r.weight.grad.abs().sum() > 0 for r in model.language_model.routers.values())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_save_pretrained_round_trip(pair, tmp_path):
    _, folder = pair
    ids, _, _ = make_batch([(4, 1, 5)], vocab=140)
    assert_round_trip(routed(folder), tmp_path, input_ids=ids, images=[pixels(4, 3)])
