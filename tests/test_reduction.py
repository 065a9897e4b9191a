"""Training-free vision-token reduction (pmod.reduction): budgets, keep = 1, batching, backends, generation, scores,
FLOPs / KV accounting, and the STRing-off switch of the MoD layer."""
from __future__ import annotations

import pytest
import torch
from conftest import make_batch, tiny_model

import pmod
from pmod.flops import count_flops, kv_cache_bytes, tokens_per_layer
from pmod.modeling.rope import apply_rope, rope_cos_sin
from pmod.reduction import ReductionSpec, make_spec
from pmod.reduction.scores import last_token_attention

ROWS = [(3, 1, 5), (6, 0, 2), (1, 1, 9), (4, 2, 3)]  # unequal image counts (9 vision tokens per image), a text-only row
SPECS = [ReductionSpec("fastv", (2,), 0.5), ReductionSpec("pyramiddrop", (1, 3, 4), 0.6), ReductionSpec("random", (0,), 0.4, 3),
         ReductionSpec("uniform", (1,), 0.5), ReductionSpec("visionzip", (), 0.75)]
IDS = [s.method for s in SPECS]


def _batch(side="right"):
    ids, mask, n = make_batch(ROWS, seed=0, side=side)
    return ids, mask, torch.randn(n, 3, 42, 42, generator=torch.Generator().manual_seed(1))


def _dense(**kw):
    return tiny_model(layers=6, schedule="none", **kw)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_cache_holds_exactly_the_budget(spec):
    model = _dense()
    model.reduction = spec
    ids, mask, pix = _batch()
    with torch.no_grad():
        out = model(input_ids=ids, images=pix, attention_mask=mask, use_cache=True)
    lens = out.past_key_values.layer_lengths()  # [L, B]
    n_vis = [9 * r[1] for r in ROWS]
    n_text = [int(mask[b].sum()) - r[1] for b, r in enumerate(ROWS)]
    for b in range(len(ROWS)):
        want = tokens_per_layer(model.config, n_vis[b], n_text[b], spec)
        assert lens[:, b].tolist() == want
        if n_vis[b]:
            assert want[-1] < n_text[b] + n_vis[b]  # something was dropped
    # the accounting of pmod.flops is the cache that was built
    kv = kv_cache_bytes(model.config, n_vis, n_text, torch.float32, "complete", reduction=spec)
    assert out.past_key_values.nbytes() == kv.total
    rep = count_flops(model.config, n_vis, n_text, "complete", reduction=spec)
    assert rep.tokens_per_layer == [int(x) for x in lens.sum(1)] and rep.total < rep.dense_total


def test_budget_counts_follow_each_method():
    assert ReductionSpec("fastv", (2,), 0.5).vision_per_layer(6, 576) == [576, 576, 288, 288, 288, 288]
    assert ReductionSpec("pyramiddrop", (8, 16, 24), 0.5).vision_per_layer(32, 576)[::8] == [576, 288, 144, 72]
    assert ReductionSpec("visionzip", (), 64 / 576 + 1e-6).vision_per_layer(4, 1152, 576) == [128] * 4
    assert make_spec("pyramiddrop", 32).layers == (8, 16, 24) and make_spec("fastv", 32).layers == (2,)
    assert make_spec("visionzip", 32, keep=0.25).keep == 0.25


@pytest.mark.parametrize("method", ["fastv", "pyramiddrop", "random", "uniform"])
def test_keep_one_equals_dense(method):
    model = _dense()
    ids, mask, pix = _batch("left")
    with torch.no_grad():
        ref = model(input_ids=ids, images=pix, attention_mask=mask).logits
        model.reduction = make_spec(method, 6, keep=1.0)
        got = model(input_ids=ids, images=pix, attention_mask=mask).logits
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)


def test_visionzip_keep_one_keeps_every_feature():
    model = _dense()
    pix = torch.randn(2, 3, 42, 42)
    with torch.no_grad():
        ref = model.encode_images(pix).view(2, 9, -1)
        model.reduction = make_spec("visionzip", 6, keep=1.0)
        got = model.encode_images(pix).view(2, 9, -1)
    for a, b in zip(got, ref):  # the same nine tokens, dominant ones first: equal as sets of rows
        torch.testing.assert_close(a[a.sum(1).argsort()], b[b.sum(1).argsort()], rtol=0, atol=1e-6)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_batched_equals_one_by_one(spec, side):
    model = _dense()
    model.reduction = spec
    ids, mask, pix = _batch(side)
    with torch.no_grad():
        out = model(input_ids=ids, images=pix, attention_mask=mask, use_cache=True)
    tokens = model.generate(input_ids=ids, images=pix, attention_mask=mask, max_new_tokens=4)
    lens, used = out.past_key_values.layer_lengths(), 0
    for b, r in enumerate(ROWS):
        real = mask[b].bool()
        one_ids, one_pix = ids[b : b + 1, real], pix[used : used + r[1]] if r[1] else None
        with torch.no_grad():
            one = model(input_ids=one_ids, images=one_pix, use_cache=True)
        torch.testing.assert_close(out.logits[b][out.attention_mask[b]], one.logits[0], rtol=1e-5, atol=1e-5)
        assert lens[:, b].tolist() == one.past_key_values.layer_lengths()
        assert torch.equal(tokens[b], model.generate(input_ids=one_ids, images=one_pix, max_new_tokens=4)[0])
        used += r[1]


@pytest.mark.parametrize("spec", SPECS[:2], ids=IDS[:2])
def test_sdpa_and_eager_choose_the_same_tokens(spec):
    model = _dense()
    model.reduction = spec
    ids, mask, pix = _batch("left")
    outs = {}
    for backend in ("eager", "sdpa"):
        model.attn_backend = backend
        with torch.no_grad():
            outs[backend] = model(input_ids=ids, images=pix, attention_mask=mask, use_cache=True)
    a, b = (outs[k].past_key_values for k in ("eager", "sdpa"))
    assert torch.equal(a.layer_lengths(), b.layer_lengths())
    for layer in range(6):  # cached keys of the kept tokens: a different choice would differ by O(1)
        torch.testing.assert_close(a.layer_kv(layer)[0], b.layer_kv(layer)[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(outs["eager"].logits, outs["sdpa"].logits, rtol=1e-4, atol=1e-4)


def test_last_token_attention_against_float64_reference():
    model = _dense().double()
    ids, mask, pix = _batch("left")
    lm = model.language_model
    with torch.no_grad():
        x, layout = model.prepare(ids, pix, None, mask)
        cos, sin = lm.rope_tables(layout.position_ids, x.dtype)
        got = last_token_attention(lm.layers[0], x, cos, sin, layout)  # [B, M]
        attn = lm.layers[0].self_attn
        h = lm.layers[0].input_layernorm(x)
        c, s = rope_cos_sin(layout.position_ids, lm.inv_freq(x.device), x.dtype)
        q = apply_rope(attn.q_proj(h).view(-1, 4, 16), c, s)
        k = apply_rope(attn.k_proj(h).view(-1, 2, 16), c, s).repeat_interleave(2, dim=1)
        start = 0
        for b, n in enumerate(layout.varlen.lens):
            rows = slice(start, start + n)
            p = (torch.einsum("hd,nhd->hn", q[start + n - 1], k[rows]) * attn.scale).softmax(-1).mean(0)  # [n]
            merged = layout.out_index[rows] % layout.merged_len
            torch.testing.assert_close(got[b, merged], p, rtol=1e-10, atol=1e-12)
            assert got[b].sum().item() == pytest.approx(1.0, abs=1e-12)
            start += n


def test_fastv_keeps_the_top_tokens_of_the_dense_run():
    """Layers < K are untouched, so layer K's cached keys are the dense run's keys at the top-k positions."""
    model = _dense()
    ids, mask, pix = make_batch([(3, 2, 4)])[0], None, torch.randn(2, 3, 42, 42)
    lm = model.language_model
    with torch.no_grad():
        dense = model(input_ids=ids, images=pix, use_cache=True)
        x, layout = model.prepare(ids, pix)
        cos, sin = lm.rope_tables(layout.position_ids, x.dtype)
        ctx = pmod.modeling.block.AttnContext(model._backend(), layout.varlen)
        h1 = lm.layers[0](x, cos, sin, ctx)
        score = last_token_attention(lm.layers[1], h1, cos, sin, layout)[0]  # FastV K = 2 ranks by layer 1
        model.reduction = ReductionSpec("fastv", (2,), 0.5)
        out = model(input_ids=ids, images=pix, use_cache=True)
    vis = layout.vision_dest
    top = vis[score[vis].topk(9).indices].sort().values
    keep = torch.cat([torch.nonzero(~layout.vision_mask).flatten(), top]).sort().values
    torch.testing.assert_close(out.past_key_values.layer_kv(2)[0][0], dense.past_key_values.layer_kv(2)[0][0][keep], rtol=0, atol=0)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_reduction_on_a_pmod_model_generates(spec):
    model = tiny_model(layers=6)  # MoD layers route among the vision tokens a drop leaves
    model.reduction = spec
    ids, mask, pix = _batch("left")
    tokens = model.generate(input_ids=ids, images=pix, attention_mask=mask, max_new_tokens=3)
    assert tokens.shape == (4, 3)


def test_bad_reduction_arguments_are_named():
    for kw, msg in [(dict(reduction="fastv", layer=0), "layer >= 1"), (dict(reduction="nope"), "expected one of"),
                    (dict(reduction="fastv", keep=1.5), "keep"), (dict(layer=2), "without reduction"),
                    (dict(reduction="fastv", layer=9), "outside a 6-layer"), (dict(reduction="visionzip", layer=1), "no layers")]:
        with pytest.raises(ValueError, match=msg):
            spec = make_spec(kw.pop("reduction", None), 6, **kw)
            _dense().reduction = spec


def test_from_pretrained_takes_a_reduction(tmp_path):
    model = _dense()
    model.save_pretrained(tmp_path / "m")
    loaded = pmod.from_pretrained(tmp_path / "m", reduction="pyramiddrop", keep=0.5)
    assert loaded.reduction == ReductionSpec("pyramiddrop", (2, 3, 4), 0.5)
    assert pmod.from_pretrained(tmp_path / "m").reduction is None


# --- STRing off ------------------------------------------------------------------------------------------------------
def test_string_off_runs_the_kept_tokens_and_passes_the_others():
    """ModConfig.string=False: the MoD layer's output is the plain layer on text + kept vision tokens, the skipped
    ones unchanged (no w scaling anywhere); the choice is the router's, as with STRing."""
    model = tiny_model(layers=2, ratios={1: 0.5}).double()
    cfg = model.config.replace(mod={**model.config.mod.__dict__, "string": False})
    off = pmod.PmodForConditionalGeneration(cfg).double().eval()
    off.load_state_dict(model.state_dict())
    ids, _, _ = make_batch([(3, 1, 4)])
    pix = torch.randn(1, 3, 42, 42, dtype=torch.float64)
    lm = off.language_model
    with torch.no_grad():
        on, got = model(input_ids=ids, images=pix), off(input_ids=ids, images=pix)
        assert torch.equal(on.routing[0].kept, got.routing[0].kept)
        x, layout = off.prepare(ids, pix)
        cos, sin = lm.rope_tables(layout.position_ids, x.dtype)
        ctx = pmod.modeling.block.AttnContext(off._backend(), layout.varlen)
        h = lm.layers[0](x, cos, sin, ctx)
        keep = torch.cat([torch.nonzero(~layout.vision_mask).flatten(), got.routing[0].kept[0]]).sort().values
        sub = pmod.modeling.block.AttnContext(off._backend(), pmod.packing.Varlen.from_lens([len(keep)], "cpu"))
        ref = h.clone()
        ref[keep] = lm.layers[1](h[keep], cos[keep], sin[keep], sub)
        ref_logits = off.lm_head(lm.norm(ref))
    torch.testing.assert_close(got.logits[0], ref_logits.float(), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(on.logits, got.logits)


def test_string_field_is_validated_and_saved(tmp_path):
    base = tiny_model(layers=2, ratios={1: 0.5}).config
    cfg = base.replace(mod={**base.mod.__dict__, "string": False})
    cfg.save(tmp_path)
    assert pmod.load_config(tmp_path).mod.string is False and base.mod.string is True
    with pytest.raises(ValueError, match="string must be true or false"):
        pmod.ModConfig(string="no")
    assert pmod.PmodForConditionalGeneration(cfg).language_model.route_specs[1].string is False


def test_gradient_checkpointing_with_a_reduction_changes_nothing():
    """Checkpointing re-runs a MoD layer in backward: it must see that layer's own (reduced) layout."""
    ids, mask, pix = _batch()
    grads = []
    for ckpt in (False, True):
        model = tiny_model(layers=6).train()
        model.reduction = ReductionSpec("pyramiddrop", (1, 3), 0.6)
        if ckpt:
            model.gradient_checkpointing_enable()
        loss = model(input_ids=ids, images=pix, attention_mask=mask, labels=ids.masked_fill(ids < 0, -100)).loss
        loss.backward()
        grads.append([p.grad.clone() for p in model.language_model.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
