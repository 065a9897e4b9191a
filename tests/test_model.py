"""Packed execution, batching, caching and gradients of the p-MoD model on tiny random configs."""
from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import make_batch, tiny_config, tiny_model

import pmod
from pmod.modeling.llava import PmodForConditionalGeneration

ROWS = [(3, 1, 5), (6, 0, 2), (1, 1, 9), (4, 2, 3)]  # unequal image counts, a text-only row


def run_rows_one_by_one(model, rows, seed=0):
    ids, mask, _ = make_batch(rows, seed=seed)
    pix = torch.randn(sum(r[1] for r in rows), 3, 42, 42, generator=torch.Generator().manual_seed(1))
    outs, used = [], 0
    for b, r in enumerate(rows):
        n = int(mask[b].sum())
        with torch.no_grad():
            outs.append(model(input_ids=ids[b : b + 1, :n], images=pix[used : used + r[1]] if r[1] else None))
        used += r[1]
    return ids, mask, pix, outs


@pytest.mark.parametrize("side", ["right", "left"])
def test_batch_equals_rows_one_by_one(side):
    model = tiny_model(layers=6)
    _, _, pix, singles = run_rows_one_by_one(model, ROWS)
    ids, mask, _ = make_batch(ROWS, seed=0, side=side)
    with torch.no_grad():
        out = model(input_ids=ids, images=pix, attention_mask=mask)
    for b, single in enumerate(singles):
        real = out.attention_mask[b]
        torch.testing.assert_close(out.logits[b][real], single.logits[0], rtol=1e-5, atol=1e-5)
        off = int(real.float().argmax())  # kept are merged positions: shifted by the row's left padding
        for rec, rec1 in zip(out.routing, single.routing):
            k = rec1.kept.shape[1]
            assert torch.equal(rec.kept[b, :k] - off, rec1.kept[0]) and (rec.kept[b, k:] == -1).all()
    # left padding puts padding first in the merged output, right padding last
    first_real = out.attention_mask.float().argmax(1)
    assert (first_real > 0).any() == (side == "left")


def test_routing_keeps_trunc_ratio_of_vision_tokens():
    model = tiny_model(layers=8)
    ids, mask, n = make_batch([(2, 1, 3), (2, 2, 1)])
    with torch.no_grad():
        out = model(input_ids=ids, images=torch.randn(n, 3, 42, 42), attention_mask=mask, use_cache=True)
    lens = out.past_key_values.layer_lengths()  # [L, B]
    for rec in out.routing:
        assert rec.num_kept == [pmod.schedule.kept_count(9, rec.ratio), pmod.schedule.kept_count(18, rec.ratio)]
        for b in range(2):
            assert lens[rec.layer, b] == out.attention_mask[b].sum() - out.vision_mask[b].sum() + rec.num_kept[b]
            kept = rec.kept[b][rec.kept[b] >= 0]
            assert out.vision_mask[b, kept].all() and (kept.diff() > 0).all()
            # the kept ones are exactly the top-k router weights among the row's vision tokens
            w = rec.weights[b].masked_fill(~out.vision_mask[b], -1)
            assert set(w.topk(len(kept)).indices.tolist()) == set(kept.tolist())
    dense_layers = set(range(8)) - {r.layer for r in out.routing}
    for layer in dense_layers:
        assert (lens[layer] == out.attention_mask.sum(1)).all()


def test_cached_decoding_equals_full_recompute():
    model = tiny_model(layers=6)
    ids, mask, n = make_batch([(3, 1, 4), (5, 1, 1)], side="left")
    pix = torch.randn(n, 3, 42, 42)
    new, cache = model.generate(input_ids=ids, images=pix, attention_mask=mask, max_new_tokens=6, return_cache=True, eos_token_id=[])
    assert new.shape == (2, 6)
    full = torch.cat([ids, new], 1)
    full_mask = torch.cat([mask, torch.ones_like(new)], 1)
    with torch.no_grad():
        ref = model(input_ids=full, images=pix, attention_mask=full_mask)
    # greedy choices made from the cache are the argmax of the full recomputation
    for b in range(2):
        real = ref.logits[b][ref.attention_mask[b]]  # [T_b, V]
        assert torch.equal(real[-7:-1].argmax(-1), new[b])
    # every layer grew by exactly one slot per decode step (5 steps after the prefill)
    with torch.no_grad():
        pre = model(input_ids=ids, images=pix, attention_mask=mask, use_cache=True).past_key_values
    assert torch.equal(cache.layer_lengths(), pre.layer_lengths() + 5)
    kv_bytes_per_token = 2 * 2 * 16 * 4  # k+v, 2 kv heads, head dim 16, float32
    assert pre.nbytes() == int(pre.layer_lengths().sum()) * kv_bytes_per_token
    assert cache.nbytes() == pre.nbytes() + 5 * 6 * 2 * kv_bytes_per_token  # 5 steps, 6 layers, 2 rows


def test_decode_logits_match_recompute_to_1e5():
    model = tiny_model(layers=5)
    ids, _, n = make_batch([(4, 1, 3)])
    pix = torch.randn(n, 3, 42, 42)
    with torch.no_grad():
        out = model(input_ids=ids, images=pix, use_cache=True, logits_to_keep="last")
        tok = out.logits.argmax(-1)
        step = model.decode_step(tok, out.past_key_values)
        ref = model(input_ids=torch.cat([ids, tok[:, None]], 1), images=pix).logits[:, -1]
    torch.testing.assert_close(step, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [[(4, 1, 3)], [(4, 1, 3), (4, 1, 3)], [(3, 1, 4), (6, 1, 1), (2, 0, 5)]],
                         ids=["one-row", "uniform-rows", "ragged-rows"])
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_cache_layouts_decode_alike(backend, rows):
    """SDPA's heads-first cache and eager's slots-first one give the same steps as a full recompute,
    with rows of equal length (no mask, strided write) and unequal ones, and when the cache outgrows
    its reserve (cache_reserve=1 forces a copy to a larger store at the second step)."""
    model = tiny_model(layers=6)
    model.attn_backend = backend
    ids, mask, n = make_batch(rows, side="left")
    pix = torch.randn(n, 3, 42, 42)
    with torch.no_grad():
        out = model(input_ids=ids, images=pix, attention_mask=mask, use_cache=True, cache_reserve=1,
                    logits_to_keep="last")
        cache, toks, steps = out.past_key_values, [out.logits.argmax(-1)], []
        assert cache.heads_first == (backend == "sdpa")
        for _ in range(3):
            steps.append(model.decode_step(toks[-1], cache))
            toks.append(steps[-1].argmax(-1))
        full = torch.cat([ids, torch.stack(toks[:3], 1)], 1)
        ref = model(input_ids=full, images=pix, attention_mask=torch.cat([mask, torch.ones(len(rows), 3, dtype=mask.dtype)], 1))
    for i, step in enumerate(steps):
        torch.testing.assert_close(step, ref.logits[:, i - 3], rtol=1e-5, atol=1e-5)
    k, v = cache.layer_kv(0)  # [B, S, G, D] whatever the storage
    assert k.shape[1] == max(cache.lengths[0]) and k.shape[2:] == (2, 16)


def test_decode_with_a_cache_of_the_other_layout_is_refused():
    model = tiny_model(layers=4)
    ids, _, n = make_batch([(4, 1, 3)])
    with torch.no_grad():
        out = model(input_ids=ids, images=torch.randn(n, 3, 42, 42), use_cache=True, logits_to_keep="last")
        model.attn_backend = "eager" if out.past_key_values.heads_first else "sdpa"
        with pytest.raises(ValueError, match="prefill again"):
            model.decode_step(out.logits.argmax(-1), out.past_key_values)


def test_every_parameter_gets_a_gradient_and_routers_learn():
    model = tiny_model(layers=6).train()
    ids, mask, n = make_batch([(3, 1, 5), (2, 1, 6)])
    labels = ids.masked_fill(mask == 0, -100).masked_fill(ids < 0, -100)
    out = model(input_ids=ids, images=torch.randn(n, 3, 42, 42), attention_mask=mask, labels=labels)
    out.loss.backward()
    no_grad = [k for k, p in model.named_parameters() if p.grad is None]
    # only what lies past the selected (penultimate) CLIP layer is unused
    assert no_grad and all(k.startswith(("vision_tower.model.encoder.layers.2.", "vision_tower.model.post_layernorm")) for k in no_grad)
    assert all(r.weight.grad.abs().sum() > 0 for r in model.language_model.routers.values())


def test_gradient_checkpointing_changes_nothing():
    model = tiny_model(layers=6).train()
    ids, mask, n = make_batch([(3, 1, 5), (2, 1, 6)])
    pix = torch.randn(n, 3, 42, 42)
    labels = ids.masked_fill(ids < 0, -100)
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.language_model.gradient_checkpointing = ckpt
        loss = model(input_ids=ids, images=pix, attention_mask=mask, labels=labels).loss
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    assert torch.equal(grads[0][0], grads[1][0])
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_backends_against_float64(backend):
    model = tiny_model(layers=4)
    model.attn_backend = backend
    ids, mask, n = make_batch(ROWS[:3])
    pix = torch.randn(n, 3, 42, 42)
    with torch.no_grad():
        ours = model(input_ids=ids, images=pix, attention_mask=mask).logits
        model.double(); model.attn_backend = "eager"
        ref = model(input_ids=ids, images=pix.double(), attention_mask=mask).logits
    torch.testing.assert_close(ours, ref.float(), rtol=1e-5, atol=2e-5)


def test_meta_device_construction_at_7b_shapes():
    cfg = pmod.PmodConfig.from_name("llava-1.5-7b", vision=tiny_config().vision)  # Vicuna-7B decoder, a tiny tower
    with torch.device("meta"):
        model = PmodForConditionalGeneration(cfg)
    n = sum(p.numel() for n_, p in model.named_parameters() if n_.startswith(("language_model", "lm_head")))
    assert 6.7e9 < n < 6.8e9  # Vicuna-7B plus 24 routers
    assert len(model.language_model.routers) == 24


def test_timm_tower_matches_its_blocks():
    pytest.importorskip("timm")
    from pmod.config import VisionConfig
    from pmod.modeling.vision import TimmTower

    cfg = VisionConfig(backend="timm", timm_model="vit_tiny_patch16_224", timm_kwargs=dict(img_size=32, depth=3), timm_width=192)
    assert cfg.hidden_size == 192  # declared: reading it builds nothing
    with pytest.raises(ValueError, match="timm_width"):
        VisionConfig(backend="timm", timm_model="vit_tiny_patch16_224")
    with pytest.raises(ValueError, match="timm_width=100 but vit_tiny_patch16_224 has 192"):
        TimmTower(VisionConfig(backend="timm", timm_model="vit_tiny_patch16_224", timm_kwargs=dict(img_size=32, depth=1), timm_width=100))
    tower = TimmTower(cfg).eval()
    x = torch.randn(2, 3, 32, 32)
    m = tower.model
    with torch.no_grad():
        h = m.norm_pre(m._pos_embed(m.patch_embed(x)))
        for blk in m.blocks[:2]:  # select_layer -2 of 3 blocks = output of block index 1
            h = blk(h)
        torch.testing.assert_close(tower(x), h[:, m.num_prefix_tokens :])
    assert tower(x).shape == (2, 4, 192)


def test_image_placeholder_errors():
    model = tiny_model()
    ids, mask, n = make_batch([(2, 1, 2)])
    with pytest.raises(ValueError, match="1 image placeholder.*0 image"):
        model(input_ids=ids, images=torch.zeros(0, 3, 42, 42))
    with pytest.raises(ValueError, match="1 image placeholder.*2 image"):
        model(input_ids=ids, images=torch.zeros(2, 3, 42, 42))
    ids2, _, _ = make_batch([(2, 2, 2)])
    with pytest.raises(ValueError, match="2 image placeholder.*1 image"):
        model(input_ids=ids2, images=torch.zeros(1, 3, 42, 42))
    with pytest.raises(ValueError, match="1 image placeholder.*0 image"):
        model(input_ids=ids)  # images=None


def test_sequence_too_long():
    model = tiny_model()
    ids = torch.randint(3, 90, (1, 510))
    ids[0, 5] = pmod.IMAGE_TOKEN_INDEX
    with pytest.raises(ValueError, match="518 tokens long.*maximum of 512"):
        model(input_ids=ids, images=torch.zeros(1, 3, 42, 42))


def test_sdpa_scope_leaves_cudnn_out_on_cuda_only(monkeypatch):
    from pmod.attention import resolve_backend, sdpa

    backend = resolve_backend("sdpa", "cpu")
    before = torch.backends.cuda.cudnn_sdp_enabled()
    with backend.scope("cuda"):  # flags only: no CUDA device needed to enter it
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled() == before
    with backend.scope("cpu"):
        assert torch.backends.cuda.cudnn_sdp_enabled() == before
    seen = []  # the model enters its backend's scope once per forward and once per decode step
    monkeypatch.setattr(sdpa, "kernel_scope", lambda device: seen.append(torch.device(device).type) or contextlib.nullcontext())
    model = tiny_model(layers=2)
    model.attn_backend = "sdpa"
    ids, mask, n = make_batch(ROWS[:1])
    with torch.no_grad():
        out = model(input_ids=ids, images=torch.randn(n, 3, 42, 42), attention_mask=mask, use_cache=True, logits_to_keep="last")
        model.decode_step(out.logits.argmax(-1), out.past_key_values)
    assert seen == ["cpu", "cpu"]
