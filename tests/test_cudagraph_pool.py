"""The decode-graph pool (`pmod.cudagraph`): bucketing, keys, reuse across calls; CPU runs it with the eager
stand-in of a capture (it writes what a replay writes), the GPU test captures for real."""
from __future__ import annotations

import pytest
import torch
from conftest import make_batch, tiny_model

from pmod import cudagraph
from pmod.cudagraph import DecodeGraphs, capacity_bucket, decode_graphs, eager_capture, graph_key

ROWS = [(3, 1, 5), (7, 0, 2), (1, 2, 4)]


def test_capacity_bucket():
    assert [capacity_bucket(n) for n in (1, 256, 257, 700, 2047, 2048, 2049, 4097, 5000)] == \
        [256, 256, 512, 768, 2048, 2048, 2304, 4608, 5120]
    for n in range(1, 20000, 37):
        b = capacity_bucket(n)
        assert n <= b and (b - n) < max(256, 0.125 * b + 1)  # at most one granule / 12.5 % unread slack
    with pytest.raises(ValueError, match="need=0"):
        capacity_bucket(0)


def _inputs(rows=ROWS, seed=3, text_shift=0):
    rows = [(a + text_shift, b, c) for a, b, c in rows]
    ids, mask, n = make_batch(rows, side="left", seed=seed)
    return dict(input_ids=ids, images=torch.randn(n, 3, 42, 42, generator=torch.Generator().manual_seed(seed)),
                attention_mask=mask)


def _cache(model, **inputs):
    out = model(**inputs, use_cache=True, logits_to_keep="last", cache_reserve=4)
    return out.past_key_values, out.logits


def test_key_buckets_nearby_lengths_together():
    model = tiny_model(layers=6)
    with torch.inference_mode():
        a, _ = _cache(model, **_inputs())
        b, _ = _cache(model, **_inputs(seed=4, text_shift=2))  # other tokens, 2 more text tokens a row
        c, _ = _cache(model, **_inputs(rows=ROWS[:2]))
    assert graph_key(model, a, 8) == graph_key(model, b, 8)
    assert graph_key(model, a, 8) != graph_key(model, c, 8)  # rows
    assert graph_key(model, a, 8) != graph_key(model, a, 300)  # capacity bucket


def test_pool_reuses_one_capture_and_matches_eager_decoding():
    model = tiny_model(layers=6)
    pool = DecodeGraphs(model, capture=eager_capture)
    with torch.inference_mode():
        for seed, shift in ((3, 0), (4, 2), (5, 1)):  # three calls, one key
            inputs = _inputs(seed=seed, text_shift=shift)
            ref_cache, logits = _cache(model, **inputs)
            cache, _ = _cache(model, **inputs)
            graph = pool.acquire(cache, 5)
            tok = logits.argmax(-1)
            for _ in range(5):
                a, b = model.decode_step(tok, ref_cache), graph.step(tok)
                torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
                tok = a.argmax(-1)
            assert cache.lengths == ref_cache.lengths and torch.equal(cache.positions, ref_cache.positions)
            graph.close(keep=False)
        assert pool.captures == 1 and len(pool.entries) == 1
        other, _ = _cache(model, **_inputs(rows=ROWS[:2]))
        pool.acquire(other, 5).close(keep=True)
    assert pool.captures == 2
    static = next(iter(pool.entries.values())).static
    assert all(k.data_ptr() != s.data_ptr() for k, s in zip(other.k, static.k))  # kept: its own tensors
    assert not other.static


def test_generate_with_the_pool_reuses_graphs_and_keeps_tokens():
    model = tiny_model(layers=6)
    pool = decode_graphs(model, capture=eager_capture)  # the model's pool, with the CPU stand-in of a capture
    kw = dict(max_new_tokens=6, eos_token_id=[])
    with torch.inference_mode():
        for seed in (3, 4):
            inputs = _inputs(seed=seed)
            eager = model.generate(**inputs, **kw)
            graphed, cache = model.generate(**inputs, **kw, cuda_graph=True, return_cache=True)
            assert torch.equal(eager, graphed)
            assert not cache.static
            # the returned cache is the caller's: a further decode equals a fresh run's
            ref = model.generate(**inputs, **kw, return_cache=True)[1]
            tok = graphed[:, -1]
            torch.testing.assert_close(model.decode_step(tok, cache), model.decode_step(tok, ref), rtol=1e-5, atol=1e-5)
    assert pool.captures == 1


def test_one_step_leaves_room_for_the_warm_up():
    """max_new_tokens=2 asks one graphed step; the capture's 2 warm-up steps must still fit the bucket."""
    model = tiny_model(layers=4)
    pool = DecodeGraphs(model, granule=1, capture=eager_capture)  # granule 1: no slack from rounding
    with torch.inference_mode():
        cache, logits = _cache(model, **_inputs())
        graph = pool.acquire(cache, 1)
        assert cache.steps_left() >= 2
        graph.step(logits.argmax(-1))
        graph.close()


def test_new_weights_drop_the_graphs():
    model = tiny_model(layers=4)
    pool = DecodeGraphs(model, capture=eager_capture)
    with torch.inference_mode():
        pool.acquire(_cache(model, **_inputs())[0], 3).close()
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())  # new tensor, new address
        pool.acquire(_cache(model, **_inputs())[0], 3).close()
    assert pool.captures == 2 and len(pool.entries) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graphs_are_captured_once_and_reused():
    model = tiny_model(layers=6).cuda()
    kw = dict(max_new_tokens=9, eos_token_id=[])
    pool = cudagraph.decode_graphs(model)
    with torch.inference_mode():
        for seed, shift in ((3, 0), (4, 2)):  # two prompts in one capacity bucket
            inputs = {k: v.cuda() for k, v in _inputs(seed=seed, text_shift=shift).items()}
            eager = model.generate(**inputs, **kw)
            assert torch.equal(eager, model.generate(**inputs, **kw, cuda_graph=True))
    assert pool.captures == 1 and len(pool.entries) == 1
