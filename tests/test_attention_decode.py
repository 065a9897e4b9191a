"""Issue 22 item 4, the backend owns the cache write: `AttentionBackend.decode_step(q, k_new, v_new, cache, layer,
scale)`. SDPA and eager write through the PmodCache (append, then attend) and must equal the path a decode step took
before (append + decode) and a float64 oracle; flash-attn's inserts inside `flash_attn_with_kvcache(k=, v=)`, tested
against a fake `flash_attn` module (the package does not install here) for the call shape, the in-place write and
the values. Legend: B rows, S slots, H/G query/kv heads, D head dim."""
from __future__ import annotations

import sys
import types

import pytest
import torch

from pmod.attention import BACKENDS
from pmod.cache import PmodCache
from pmod.packing import Varlen

B, H, G, D = 3, 4, 2, 8
LENS = [5, 2, 7]  # ragged rows after prefill


def _oracle(q, ks, vs, scale):
    """float64: row b's query over its slots ks[b] [S_b, G, D]. -> [B, H, D]"""
    out = []
    for b in range(q.shape[0]):
        k = ks[b].double().repeat_interleave(H // G, dim=1)  # [S_b, H, D]
        v = vs[b].double().repeat_interleave(H // G, dim=1)
        p = (torch.einsum("hd,shd->hs", q[b].double(), k) * scale).softmax(-1)
        out.append(torch.einsum("hs,shd->hd", p, v))
    return torch.stack(out)


def _prefilled(lens, heads_first, reserve=1):
    vl = Varlen.from_lens(lens, "cpu")
    k, v = torch.randn(vl.total, G, D), torch.randn(vl.total, G, D)
    cache = PmodCache(1, len(lens), reserve=reserve, heads_first=heads_first)
    cache.store(0, k, v, vl)
    cache.positions = torch.tensor(lens)  # what a prefill sets; make_static needs it
    rows_k = list(k.split(lens)), list(v.split(lens))
    return cache, rows_k


@pytest.mark.parametrize("name", ["sdpa", "eager"])
@pytest.mark.parametrize("lens", [LENS, [4, 4, 4]], ids=["ragged", "uniform"])
@pytest.mark.parametrize("static", [False, True])
def test_write_through_equals_append_then_decode_and_the_oracle(name, lens, static):
    be = BACKENDS[name]()
    torch.manual_seed(0)
    cache, (ks, vs) = _prefilled(lens, be.heads_first_cache)
    ref = cache.copy()
    if static:
        cache.make_static(3)
        ref.make_static(3)
    scale = D**-0.5
    for step in range(3):  # past the reserve of 1: the cache grows (non-static)
        q, kn, vn = torch.randn(B, H, D), torch.randn(B, G, D), torch.randn(B, G, D)
        o = be.decode_step(q, kn, vn, cache, 0, scale)
        kc, vc, sl, uni = ref.append(0, kn, vn)
        o_old = be.decode(q, kc, vc, sl, scale, uni)
        torch.testing.assert_close(o, o_old, rtol=0, atol=0)  # same ops as before: bit for bit
        ks = [torch.cat([ks[b], kn[b, None]]) for b in range(B)]
        vs = [torch.cat([vs[b], vn[b, None]]) for b in range(B)]
        torch.testing.assert_close(o.double(), _oracle(q, ks, vs, scale), rtol=1e-5, atol=1e-5)
        assert cache.lengths[0] == [n + step + 1 for n in lens]
        assert cache.seqlens[0].tolist() == cache.lengths[0]


def _fake_flash(calls: list):
    """flash_attn_with_kvcache as documented: writes k, v at cache_seqlens[b] in place, attends causally over the
    first cache_seqlens[b] + 1 slots (one query: all of them)."""

    def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, cache_seqlens=None, softmax_scale=None,
                                causal=False, **kw):
        calls.append(dict(q=q.shape, k_cache=k_cache, k=None if k is None else k.shape, seqlens=cache_seqlens.clone(),
                          dtype=cache_seqlens.dtype, causal=causal, scale=softmax_scale, kw=kw))
        assert k_cache.shape[0] == q.shape[0] and k_cache.shape[2:] == (G, D), "cache must be [B, S, G, D]"
        out = torch.empty_like(q)
        for b in range(q.shape[0]):
            n = int(cache_seqlens[b])
            if k is not None:
                k_cache[b, n], v_cache[b, n] = k[b, 0], v[b, 0]
                n += 1
            kk = k_cache[b, :n].repeat_interleave(H // G, dim=1)
            vv = v_cache[b, :n].repeat_interleave(H // G, dim=1)
            p = (torch.einsum("hd,shd->hs", q[b, 0], kk) * softmax_scale).softmax(-1)
            out[b, 0] = torch.einsum("hs,shd->hd", p, vv)
        return out

    return types.SimpleNamespace(flash_attn_with_kvcache=flash_attn_with_kvcache,
                                 flash_attn_varlen_func=lambda *a, **k: pytest.fail("prefill not under test"))


@pytest.mark.parametrize("static", [False, True])
def test_flash_inserts_inside_its_kernel(monkeypatch, static):
    calls: list = []
    monkeypatch.setitem(sys.modules, "flash_attn", _fake_flash(calls))
    flash = BACKENDS["flash"]()
    assert not flash.heads_first_cache
    torch.manual_seed(0)
    cache, (ks, vs) = _prefilled(LENS, heads_first=False, reserve=1)
    if static:
        cache.make_static(3)
    scale = D**-0.5
    for step in range(3):
        before = list(cache.lengths[0])
        q, kn, vn = torch.randn(B, H, D), torch.randn(B, G, D), torch.randn(B, G, D)
        o = flash.decode_step(q, kn, vn, cache, 0, scale)
        c = calls[-1]
        assert c["q"] == (B, 1, H, D) and c["k"] == (B, 1, G, D) and c["causal"] and c["scale"] == scale
        assert c["dtype"] == torch.int32 and c["seqlens"].tolist() == before  # lengths before the write
        assert c["k_cache"] is cache.k[0], "the kernel must write into the cache's own storage"
        assert cache.lengths[0] == [n + 1 for n in before] and cache.seqlens[0].tolist() == cache.lengths[0]
        ks = [torch.cat([ks[b], kn[b, None]]) for b in range(B)]
        vs = [torch.cat([vs[b], vn[b, None]]) for b in range(B)]
        torch.testing.assert_close(o.double(), _oracle(q, ks, vs, scale), rtol=1e-5, atol=1e-5)
        kv = cache.layer_kv(0)  # the slots as the cache reports them hold what was inserted
        for b in range(B):
            torch.testing.assert_close(kv[0][b, : cache.lengths[0][b]], ks[b], rtol=0, atol=0)
    assert len(calls) == 3


def test_flash_module_loads_without_flash_attn(monkeypatch):
    """The import is lazy: the module loads without the package; the first call names what is missing."""
    monkeypatch.setitem(sys.modules, "flash_attn", None)
    from pmod.attention import flash

    with pytest.raises(ImportError):
        flash.decode(torch.zeros(1, H, D), torch.zeros(1, 2, G, D), torch.zeros(1, 2, G, D), torch.ones(1), 1.0)
