"""Continuing from a cache (issue 23): a chunk appended to a reduced cache equals recomputing the whole sequence.

References: the model's own from-scratch forward for text chunks (PMOD_SPEC §5: routing of a vision token
depends only on the tokens before it), and for a chunk with a second image an independent p-MoD
forward in this file that routes each image on its own (the chunk routes its new image as its own prefill).
"""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_model

from pmod.attention import resolve_backend
from pmod.modeling.block import AttnContext
from pmod.packing import IMAGE_TOKEN_INDEX as IMG
from pmod.packing import Varlen
from pmod.routing import normalize_router_logits
from pmod.schedule import kept_count

V = 97
TOL = 1e-5


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, V, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(map(len, rows))
    ids, mask = torch.zeros(len(rows), T, dtype=torch.long), torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, T - len(r):], mask[b, T - len(r):] = torch.tensor(r), 1
    return ids, mask


def _pixels(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 42, 42, generator=torch.Generator().manual_seed(seed))


def _model(kind: str, backend: str):
    model = tiny_model(layers=6, schedule="none") if kind == "dense" else tiny_model(layers=6)
    model.attn_backend = backend
    return model


def _prefix_rows(batch: int) -> list[list[int]]:
    """Rows of different lengths, one image each: (1, text, image, text)."""
    shapes = [(3, 5), (7, 2), (1, 4)][:batch]
    return [[1] + _ids(a, 10 + b) + [IMG] + _ids(c, 20 + b) for b, (a, c) in enumerate(shapes)]


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", ["dense", "pmod"])
@pytest.mark.parametrize("batch", [1, 3])
def test_text_chunk_equals_recompute(kind, backend, batch):
    """Logits of a text chunk after a cached image prefix = the full sequence's from scratch (left-padded, per-row
    chunk lengths); greedy generation from the cache = greedy generation of the whole prompt."""
    model = _model(kind, backend)
    prefix = _prefix_rows(batch)
    chunk = [_ids(n, 30 + b) for b, n in enumerate([4, 1, 6][:batch])]
    pix = _pixels(batch, 1)
    ids_p, mask_p = _left_pad(prefix)
    ids_c, mask_c = _left_pad(chunk)
    ids_f, mask_f = _left_pad([p + c for p, c in zip(prefix, chunk)])
    with torch.no_grad():
        full = model(input_ids=ids_f, images=pix, attention_mask=mask_f).logits  # [B, M, V]
        cache = model(input_ids=ids_p, images=pix, attention_mask=mask_p, use_cache=True).past_key_values
        out = model(input_ids=ids_c, attention_mask=mask_c, past_key_values=cache.copy()).logits  # [B, Mc, V]
    for b, c in enumerate(chunk):
        n = len(c)
        torch.testing.assert_close(out[b, -n:], full[b, -n:], atol=TOL, rtol=0)
    want = model.generate(input_ids=ids_f, images=pix, attention_mask=mask_f, max_new_tokens=6, eos_token_id=[])
    got = model.generate(input_ids=ids_c, attention_mask=mask_c, past_key_values=cache, max_new_tokens=6, eos_token_id=[])
    assert torch.equal(got, want)


def reference_logits(model, ids: list[int], pixels: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """[T, V] logits of one row, in `dtype`, every image routed on its own (k = trunc(n_image * ratio)).
    Written against the p-MoD equations, not against mod.py: router on the layer input of the vision tokens,
    top-k per image, kept + text tokens through attention and MLP, STRing merge (x * w; kept: h_mid + w * m).
    Run in the model's precision: top-k is discrete, and float64 flips near-ties of float32 router weights
    (seen here: one token of 9 at a gap under 1e-6), which moves the logits by 0.1 for reasons unrelated to caching."""
    m = copy.deepcopy(model).to(dtype)
    x, layout = m.prepare(torch.tensor([ids]), pixels.to(dtype))
    lm, mod = m.language_model, m.config.mod
    eager = resolve_backend("eager")
    cos, sin = lm.rope_tables(layout.position_ids, x.dtype)
    N = x.shape[0]
    vis = layout.vision_dest.split(m.image_token_counts(pixels, None))  # packed indices of each image
    text = torch.nonzero(~layout.vision_mask).squeeze(1)
    for i, layer in enumerate(lm.layers):
        if str(i) not in lm.routers:
            x = layer(x, cos, sin, AttnContext(eager, Varlen.from_lens([N], x.device)))
            continue
        w = torch.ones(N, dtype=x.dtype)
        kept = [text]
        for img in vis:
            r = lm.routers[str(i)](x[img]).squeeze(-1)[None]  # [1, n]
            w[img] = normalize_router_logits(r, torch.ones_like(r, dtype=torch.bool), mod.norm, mod.norm_scale, mod.norm_bias)[0]
            kept.append(img[w[img].topk(kept_count(len(img), lm.ratios[i])).indices])
        idx = torch.cat(kept).sort().values
        h_mid = layer.attend(x[idx], cos[idx], sin[idx], AttnContext(eager, Varlen.from_lens([len(idx)], x.device)))
        out = x * w[:, None]
        out[idx] = h_mid + w[idx, None] * layer.feed_forward(h_mid)
        x = out
    return m.lm_head(lm.norm(x)).float()


def test_reference_matches_the_model_on_one_image():
    """The reference above is the model's own forward wherever routing is per image anyway (one image per row)."""
    model = _model("pmod", "eager")
    ids = _prefix_rows(1)[0] + _ids(3, 5)
    pix = _pixels(1, 2)
    with torch.no_grad():
        want = model(input_ids=torch.tensor([ids]), images=pix).logits[0]
        torch.testing.assert_close(reference_logits(model, ids, pix), want, atol=TOL, rtol=0)


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("batch", [1, 3])
def test_chunk_with_a_second_image(backend, batch):
    """A chunk adding a second image per row: its vision tokens are routed over the cached prefix; logits and
    greedy tokens equal the reference of the whole two-image sequence."""
    model = _model("pmod", backend)
    prefix = _prefix_rows(batch)
    chunk = [_ids(a, 40 + b) + [IMG] + _ids(c, 50 + b) for b, (a, c) in enumerate([(2, 3), (0, 5), (4, 1)][:batch])]
    pix1, pix2 = _pixels(batch, 3), _pixels(batch, 4)
    ids_p, mask_p = _left_pad(prefix)
    ids_c, mask_c = _left_pad(chunk)
    with torch.no_grad():
        cache = model(input_ids=ids_p, images=pix1, attention_mask=mask_p, use_cache=True).past_key_values
        out = model(input_ids=ids_c, images=pix2, attention_mask=mask_c, past_key_values=cache.copy()).logits
    tokens = model.generate(input_ids=ids_c, images=pix2, attention_mask=mask_c, past_key_values=cache,
                            max_new_tokens=3, eos_token_id=[])
    for b in range(batch):
        full = prefix[b] + chunk[b]
        ref = reference_logits(model, full, torch.stack([pix1[b], pix2[b]]))
        n = len(chunk[b]) + 9 - 1  # the chunk's merged length: its image is 9 tokens
        torch.testing.assert_close(out[b, -n:], ref[-n:], atol=TOL, rtol=0)
        greedy = []
        for _ in range(3):  # greedy by recomputing the whole sequence each step
            greedy.append(int(reference_logits(model, full + greedy, torch.stack([pix1[b], pix2[b]]))[-1].argmax()))
        assert tokens[b].tolist() == greedy, b


def test_cache_stays_reduced_across_turns():
    """After a prefill and three generate turns from the cache, each layer holds every text token and only its
    kept vision tokens: layer length = text tokens + kept_count(9, ratio) on MoD layers (+ all 9 on dense)."""
    model = _model("pmod", "sdpa")
    ids = _prefix_rows(1)[0]
    cache = model(input_ids=torch.tensor([ids]), images=_pixels(1, 5), use_cache=True).past_key_values
    n_text = len(ids) - 1
    for turn in range(3):
        new = _ids(3 + turn, 60 + turn)
        tokens, cache = model.generate(input_ids=torch.tensor([new]), past_key_values=cache, max_new_tokens=4,
                                       eos_token_id=[], return_cache=True)
        n_text += len(new) + tokens.shape[1] - 1  # the last generated token is not fed back
    ratios = model.language_model.ratios
    want = [n_text + (kept_count(9, ratios[i]) if i in ratios else 9) for i in range(6)]
    assert cache.layer_lengths() == want and any(w < n_text + 9 for w in want)
    assert int(cache.positions[0]) == n_text + 9


def test_copy_continues_one_prefix_several_ways():
    """cache.copy() is independent: two continuations of one prefix each equal their own recompute, and the
    original cache is untouched."""
    model = _model("pmod", "eager")
    ids, pix = _prefix_rows(1)[0], _pixels(1, 6)
    cache = model(input_ids=torch.tensor([ids]), images=pix, use_cache=True).past_key_values
    before = (cache.layer_lengths(), [k.clone() for k in cache.k])
    for seed in (70, 71):
        new = _ids(4, seed)
        got = model.generate(input_ids=torch.tensor([new]), past_key_values=cache.copy(), max_new_tokens=5, eos_token_id=[])
        want = model.generate(input_ids=torch.tensor([ids + new]), images=pix, max_new_tokens=5, eos_token_id=[])
        assert torch.equal(got, want), seed
    assert cache.layer_lengths() == before[0] and all(torch.equal(a, b) for a, b in zip(cache.k, before[1]))


def test_bad_continuations_are_named():
    model = _model("pmod", "sdpa")
    ids_p, mask_p = _left_pad(_prefix_rows(3))
    cache = model(input_ids=ids_p, images=_pixels(3, 7), attention_mask=mask_p, use_cache=True).past_key_values
    with pytest.raises(ValueError, match="holds 3 row"):
        model(input_ids=torch.tensor([[5, 6]]), past_key_values=cache)
    with pytest.raises(ValueError, match="labels with past_key_values"):
        model(input_ids=torch.full((3, 2), 5), past_key_values=cache, labels=torch.full((3, 2), 5))
    with pytest.raises(TypeError, match="PmodCache"):
        model(input_ids=torch.full((3, 2), 5), past_key_values=[(None, None)])
    with pytest.raises(ValueError, match="context"):
        model.generate(input_ids=torch.full((3, 2), 5), past_key_values=cache, max_new_tokens=500)
    model.attn_backend = "eager"  # reads the other cache layout
    with pytest.raises(ValueError, match="other layout"):
        model(input_ids=torch.full((3, 2), 5), past_key_values=cache)


def test_copy_with_spare_slots_continues_the_same_way():
    """copy(spare=n) sizes each layer to its filled slots + n (zeros beyond): the same tokens, no reallocation."""
    model = _model("pmod", "sdpa")
    ids_p, mask_p = _left_pad(_prefix_rows(3))
    cache = model(input_ids=ids_p, images=_pixels(3, 8), attention_mask=mask_p, use_cache=True).past_key_values
    chunk = torch.full((3, 3), 7)
    want = model.generate(input_ids=chunk, past_key_values=cache.copy(), max_new_tokens=4, eos_token_id=[])
    tight = cache.copy(spare=3 + 4)
    for i in range(6):
        n = max(cache.lengths[i])
        assert tight.k[i].shape[2] == n + 7 and not tight.k[i][:, :, n:].any()
    ks = [k.data_ptr() for k in tight.k]
    assert torch.equal(model.generate(input_ids=chunk, past_key_values=tight, max_new_tokens=4, eos_token_id=[]), want)
    assert [k.data_ptr() for k in tight.k] == ks  # the chunk and the decode steps fit: nothing was reallocated
