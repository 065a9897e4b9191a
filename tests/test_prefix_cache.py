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
