"""pmod.prefix_cache: keys, the byte bound (LRU), hit/miss counts, and continuing a cached prefix = the whole prompt."""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from pmod.packing import IMAGE_TOKEN_INDEX as IMG
from pmod.prefix_cache import PrefixCache, continue_prefix, image_digest, prefix_key, split_prefix


def _cache(model, n_text: int, seed: int = 0):
    ids = torch.tensor([[1] + list(range(5, 5 + n_text)) + [IMG]])
    pix = torch.randn(1, 3, 42, 42, generator=torch.Generator().manual_seed(seed))
    return model(input_ids=ids, images=pix, use_cache=True).past_key_values


def test_split_and_keys():
    assert split_prefix([1, 5, IMG, 7, 8]) == 3 and split_prefix([1, 5, 7]) == 0 and split_prefix([1, IMG]) == 0
    a, b = torch.zeros(3, 4, 4), torch.zeros(3, 4, 4)
    b[0, 0, 0] = 1e-3
    assert image_digest(a) == image_digest(a.clone()) != image_digest(b)
    assert image_digest(a) != image_digest(a.half()) and image_digest(a) != image_digest(a.view(3, 16))
    k = prefix_key([image_digest(a)], [1, IMG])
    assert k == prefix_key([image_digest(a)], [1, IMG]) != prefix_key([image_digest(b)], [1, IMG])
    assert k != prefix_key([image_digest(a)], [1, 5, IMG]) and k != prefix_key([image_digest(a)], [1, IMG], salt="other model")


def test_lru_within_the_byte_bound_and_counts():
    model = tiny_model(layers=2)
    c = [_cache(model, 2, seed=s) for s in range(4)]
    size = c[0].nbytes()
    pc = PrefixCache(max_bytes=3 * size)
    for i in range(3):
        assert pc.put(str(i), c[i])
    assert pc.get("0") is not None  # "0" is now the most recent: "1" goes first
    assert pc.put("3", c[3]) and "1" not in pc and len(pc) == 3
    assert pc.get("1") is None
    st = pc.stats()
    assert (st.hits, st.misses, st.evictions, st.entries, st.bytes) == (1, 1, 1, 3, 3 * size) and st.bytes <= st.max_bytes
    assert not PrefixCache(size - 1).put("big", c[0])  # larger than the bound alone: not stored
    got = pc.get("0")
    got.k[0].zero_()  # a copy: the stored prefix is unchanged
    assert not torch.equal(pc.get("0").k[0], got.k[0])
    with pytest.raises(ValueError, match="max_bytes"):
        PrefixCache(-1)


def test_questions_about_one_image_from_one_prefix_equal_whole_prompts():
    """Three questions about one image: the first misses and stores the prefix, the others hit; every answer equals
    generating from the whole prompt."""
    model = tiny_model(layers=6)
    pix = torch.randn(1, 3, 42, 42, generator=torch.Generator().manual_seed(1))
    pc = PrefixCache(1 << 22)
    hits = []
    for q in ([10, 11, 12], [13], [14, 15, 16, 17, 18]):
        ids = torch.tensor([[1, 5, 6, IMG] + q])
        kw, hit = continue_prefix(model, pc, ids, pix)
        hits.append(hit)
        assert kw["input_ids"].tolist() == [q]
        got = model.generate(**kw, max_new_tokens=5, eos_token_id=[])
        assert torch.equal(got, model.generate(input_ids=ids, images=pix, max_new_tokens=5, eos_token_id=[])), q
    assert hits == [False, True, True] and (pc.hits, pc.misses) == (2, 1)
    kw, hit = continue_prefix(model, pc, torch.tensor([[1, 5, 6]]))  # no image: nothing to reuse
    assert not hit and "past_key_values" not in kw


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_row_prefix_of_a_whole_prefill_equals_prefilling_the_prefix(backend):
    """The server cuts a miss's prefix out of its whole prefill: for each row of a left-padded batch, the rows'
    [prefix, text suffix] cache without the suffix equals a prefill of the prefix alone (lengths exactly, k/v in
    float32 within 1e-5), and stacking the cut rows gives back those rows."""
    from pmod.prefix_cache import row_prefix, stack_rows

    model = tiny_model(layers=6)
    model.attn_backend = backend
    pix = torch.randn(2, 3, 42, 42, generator=torch.Generator().manual_seed(3))
    rows = [[1, 5, 6, IMG, 10, 11, 12], [1, 7, IMG, 13, 14, 15, 16, 17]]  # suffixes of 3 and 5 text tokens
    T = max(map(len, rows))
    ids = torch.tensor([[0] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    with torch.inference_mode():
        whole = model(input_ids=ids, images=pix, attention_mask=mask, use_cache=True).past_key_values
        cut = [row_prefix(whole, b, len(r) - r.index(IMG) - 1) for b, r in enumerate(rows)]
        alone = [model(input_ids=torch.tensor([r[: r.index(IMG) + 1]]), images=pix[b : b + 1], use_cache=True).past_key_values
                 for b, r in enumerate(rows)]
    for c, a in zip(cut, alone):
        assert c.lengths == a.lengths and torch.equal(c.positions, a.positions)
        assert c.layer_lengths()[-1] < c.layer_lengths()[0]  # a MoD layer holds fewer than a dense one
        for i in range(c.num_layers):
            n = a.lengths[i][0]
            for x, y in ((c.k[i], a.k[i]), (c.v[i], a.v[i])):
                torch.testing.assert_close(c.slots(x)[:, :n], a.slots(y)[:, :n], atol=1e-5, rtol=1e-5)
            assert torch.equal(c.seqlens[i], torch.tensor([n]))
    both = stack_rows(cut, spare=4)
    assert both.batch_size == 2 and both.lengths == [[x.lengths[i][0] for x in cut] for i in range(both.num_layers)]
    for b, c in enumerate(cut):
        for i in range(c.num_layers):
            n = c.lengths[i][0]
            assert torch.equal(both.slots(both.k[i])[b, :n], c.slots(c.k[i])[0, :n])
            assert both.k[i].shape[both.slot_dim] == max(both.lengths[i]) + 4
    with pytest.raises(ValueError, match="fewer than"):
        row_prefix(whole, 0, 10**6)
    with pytest.raises(ValueError, match="one-row caches"):
        stack_rows([whole])
