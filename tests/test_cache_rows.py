"""PmodCache row operations for continuous batching: rows inserted from another prefill, dropped, compacted,
then decoded together give what each row gives decoded alone."""
from __future__ import annotations

import pytest
import torch
from conftest import make_batch, tiny_model

ROWS = [(3, 1, 5), (7, 0, 2), (1, 1, 9)]  # different lengths and different kept counts per MoD layer


def _prefill(model, rows, seed, reserve=0):
    ids, mask, n = make_batch(rows, seed=seed, side="left")
    pix = torch.randn(n, 3, 42, 42, generator=torch.Generator().manual_seed(seed)) if n else None
    with torch.inference_mode():
        out = model(input_ids=ids, images=pix, attention_mask=mask, use_cache=True, cache_reserve=reserve,
                    logits_to_keep="last", output_routing=False)
    return out.past_key_values, out.logits


def _decode(model, cache, logits, steps):
    """Greedy tokens [B, steps], the logits each was chosen from, and the logits after feeding the last one."""
    toks, seen = [], []
    with torch.inference_mode():
        for _ in range(steps):
            t = logits.argmax(-1)
            toks.append(t)
            seen.append(logits)
            logits = model.decode_step(t, cache)
    return torch.stack(toks, 1), seen, logits


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_inserted_rows_decode_like_alone(backend):
    model = tiny_model(layers=4)
    model.attn_backend = backend
    alone = []
    for i, row in enumerate(ROWS):
        cache, logits = _prefill(model, [row], seed=i)
        alone.append(_decode(model, cache, logits, 6)[0][0])
    # row 0 starts alone and decodes 2 steps; rows 1 and 2 join (one packed prefill of their own), then all decode
    cache, logits = _prefill(model, [ROWS[0]], seed=0, reserve=1)
    first, _, logits0 = _decode(model, cache, logits, 2)
    parts = [_prefill(model, [r], seed=i) for i, r in ((1, ROWS[1]), (2, ROWS[2]))]
    for c, _ in parts:
        cache.insert_rows(c)
    assert cache.batch_size == 3 and cache.layer_lengths().shape == (4, 3)
    both, _, _ = _decode(model, cache, torch.cat([logits0, parts[0][1], parts[1][1]]), 4)
    assert torch.equal(torch.cat([first[0], both[0]]), alone[0])
    assert torch.equal(both[1], alone[1][:4]) and torch.equal(both[2], alone[2][:4])


def test_drop_rows_and_compact_keep_the_others_exact():
    model = tiny_model(layers=4)
    cache, logits = _prefill(model, ROWS, seed=5, reserve=8)
    ref_cache, ref_logits = _prefill(model, ROWS, seed=5, reserve=8)
    ref, ref_seen, _ = _decode(model, ref_cache, ref_logits, 5)
    toks, _, logits = _decode(model, cache, logits, 2)  # 2 steps for everyone, then row 1 leaves
    lens_before = cache.layer_lengths()[:, [0, 2]].clone()
    cache.drop_rows([1])
    assert cache.batch_size == 2 and torch.equal(cache.layer_lengths(), lens_before)
    cap = [k.shape[cache.slot_dim] for k in cache.k]
    cache.compact()
    assert all(k.shape[cache.slot_dim] == int(n) for k, n in zip(cache.k, lens_before.max(1).values))
    assert all(k.shape[cache.slot_dim] <= c for k, c in zip(cache.k, cap))
    rest, seen, _ = _decode(model, cache, logits[[0, 2]], 3)  # grows again past the compacted capacity
    assert torch.equal(torch.cat([toks[[0, 2]], rest], 1), ref[[0, 2]])
    torch.testing.assert_close(seen[-1], ref_seen[-1][[0, 2]], rtol=0, atol=1e-5)


def test_drop_every_row_then_insert():
    model = tiny_model(layers=4)
    cache, _ = _prefill(model, ROWS[:2], seed=1)
    cache.drop_rows([0, 1])
    assert cache.batch_size == 0 and cache.nbytes() == 0
    fresh, logits = _prefill(model, [ROWS[2]], seed=2)
    cache.insert_rows(fresh)
    ref_cache, ref_logits = _prefill(model, [ROWS[2]], seed=2)
    assert torch.equal(_decode(model, cache, logits, 4)[0], _decode(model, ref_cache, ref_logits, 4)[0])


def test_row_operations_refuse_bad_input():
    model = tiny_model(layers=4)
    cache, _ = _prefill(model, ROWS[:2], seed=1)
    with pytest.raises(IndexError, match=r"row\(s\) \[2\] outside a batch of 2"):
        cache.drop_rows([2])
    other, _ = _prefill(tiny_model(layers=2), ROWS[:1], seed=1)
    with pytest.raises(ValueError, match="4 vs 2 layers"):
        cache.insert_rows(other)
