"""PmodCache.snapshot / restore: the one way to rewind a cache, in dynamic and static mode."""
from __future__ import annotations

import pytest
import torch
from conftest import make_batch, tiny_model

ROWS = [(3, 1, 5), (6, 0, 2), (1, 1, 9)]  # unequal lengths through MoD layers


def _prefill(model, side="left"):
    ids, mask, n = make_batch(ROWS, side=side)
    pix = torch.randn(n, 3, 42, 42, generator=torch.Generator().manual_seed(3))
    out = model(input_ids=ids, images=pix, attention_mask=mask, use_cache=True, logits_to_keep="last", cache_reserve=2)
    return out.past_key_values, out.logits


def _decode(model, cache, logits, steps):
    outs, tok = [], logits.argmax(-1)
    for _ in range(steps):
        out = model.decode_step(tok, cache)
        outs.append(out.clone())
        tok = out.argmax(-1)
    return torch.stack(outs)


@pytest.mark.parametrize("static", [False, True])
def test_decode_restore_decode_again_is_identical(static):
    model = tiny_model(layers=6)
    with torch.inference_mode():
        cache, logits = _prefill(model)
        if static:
            cache.make_static(12)
        lengths = [list(r) for r in cache.lengths]
        snap = cache.snapshot()
        ptrs = [k.data_ptr() for k in cache.k]
        first = _decode(model, cache, logits, 6)  # past the reserve of 2: a dynamic cache grows (reallocates)
        assert cache.lengths != lengths
        cache.restore(snap)
        assert cache.lengths == lengths and torch.equal(cache.positions, snap.positions)
        again = _decode(model, cache, logits, 6)
        cache.restore(snap)  # the same snapshot twice
        third = _decode(model, cache, logits, 6)
    assert torch.equal(first, again) and torch.equal(first, third)
    if static:  # in place: a captured graph keeps reading the same tensors
        assert [k.data_ptr() for k in cache.k] == ptrs and cache.static


def test_restore_after_a_continuation_chunk():
    model = tiny_model(layers=4)
    with torch.inference_mode():
        cache, _ = _prefill(model, side="right")
        snap = cache.snapshot()
        chunk = torch.randint(3, 97, (3, 4), generator=torch.Generator().manual_seed(9))
        a = model(input_ids=chunk, past_key_values=cache, logits_to_keep="last").logits
        cache.restore(snap)
        b = model(input_ids=chunk, past_key_values=cache, logits_to_keep="last").logits
    assert torch.equal(a, b)


def test_restore_refuses_what_it_cannot_rewind():
    model = tiny_model(layers=4)
    with torch.inference_mode():
        cache, logits = _prefill(model)
        other, _ = _prefill(model)
        a = cache.snapshot()
        _decode(model, cache, logits, 2)
        b = cache.snapshot()
        with pytest.raises(ValueError, match="does not describe this cache"):
            other.restore(a)  # another cache's
        cache.restore(a)
        with pytest.raises(ValueError, match="does not describe this cache"):
            cache.restore(b)  # taken after the snapshot restored since: its slots are overwritten next
        cache.restore(a)  # still fine
        c = cache.snapshot()
        cache.drop_rows([1])
        with pytest.raises(ValueError, match="rows moved"):
            cache.restore(c)
        d = other.snapshot()
        other.lengths = [[n - 1 for n in r] for r in other.lengths]  # shorter than the snapshot
        with pytest.raises(ValueError, match="can only rewind"):
            other.restore(d)
