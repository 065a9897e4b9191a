"""The packed layout's host-side planning: one upload per forward, route plans, the uniform fast path."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import make_batch, tiny_model

from pmod.packing import build_layout, plan_route, plan_routes, upload
from pmod.schedule import kept_count


def test_upload_is_one_buffer_of_views():
    arrays = {"a": np.arange(6).reshape(2, 3), "b": np.array([True, False]), "c": np.zeros(0, np.int64)}
    t = upload(arrays, "cpu")
    assert t["a"].tolist() == [[0, 1, 2], [3, 4, 5]] and t["b"].tolist() == [1, 0] and t["c"].numel() == 0
    assert all(x.dtype == torch.long for x in t.values())
    assert t["a"].untyped_storage().data_ptr() == t["b"].untyped_storage().data_ptr()  # one copy, not three


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_upload_to_cuda_matches_host():
    arrays = {"a": np.arange(12).reshape(3, 4), "b": np.array([5, -1])}
    t = upload(arrays, "cuda")  # pinned, non-blocking: reading it back must still see the values
    assert t["a"].device.type == "cuda" and t["a"].cpu().tolist() == arrays["a"].tolist() and t["b"].cpu().tolist() == [5, -1]


@pytest.mark.parametrize("rows, uniform", [([(2, 1, 3)], True), ([(2, 1, 3), (4, 1, 1)], True), ([(2, 1, 3), (3, 0, 2)], False)])
def test_plan_routes_equal_one_by_one(rows, uniform):
    ids, mask, n = make_batch(rows)
    layout = build_layout(ids, mask, [16] * n, "cpu")
    ratios = [0.9, 0.5, 0.25]
    together = plan_routes(layout, ratios)
    for r in ratios:
        one = plan_route(layout, r)
        got = together[r]
        assert got.k == one.k == [kept_count(v, r) for v in layout.n_vision]
        assert got.uniform == one.uniform == uniform
        for f in ("cu_seqlens", "row", "slot", "seqlens"):
            assert torch.equal(getattr(got.varlen, f), getattr(one.varlen, f)), f
        assert got.varlen.lens == one.varlen.lens and got.varlen.seqlens.tolist() == one.varlen.lens
    again = plan_routes(layout, [0.25, 0.25, 0.9])  # a ratio twice: planned once, indices still line up
    assert list(again) == [0.25, 0.9] and torch.equal(again[0.9].varlen.row, together[0.9].varlen.row)
    with pytest.raises(ValueError, match="ratio"):
        plan_routes(layout, [0.0])


def test_uniform_fast_path_equals_the_general_one(monkeypatch):
    """Rows with equal vision counts take the short route (no padding masks); forcing the general path must
    give the same outputs, kept tokens and router weights."""
    import pmod.packing as packing

    model = tiny_model(layers=6)
    ids, mask, n = make_batch([(2, 1, 3), (4, 1, 1)])
    pix = torch.randn(n, 3, 42, 42)
    with torch.no_grad():
        fast = model(input_ids=ids, images=pix, attention_mask=mask)
        general_plans = packing.plan_routes
        monkeypatch.setattr(packing, "plan_routes", lambda *a: {r: dataclasses.replace(p, uniform=False)
                                                               for r, p in general_plans(*a).items()})
        slow = model(input_ids=ids, images=pix, attention_mask=mask)
    assert torch.equal(fast.logits, slow.logits)
    for a, b in zip(fast.routing, slow.routing, strict=True):
        assert torch.equal(a.kept, b.kept) and torch.equal(a.weights, b.weights)
