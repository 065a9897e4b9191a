"""Hardening of forward / generate arguments (issue 16): every bad input is a ValueError naming the argument and
the value before anything runs or allocates; NaN/Inf during generation stops with an error; `routing.kept` is in
the merged-sequence index space of logits / attention_mask / vision_mask for every batch layout."""
from __future__ import annotations

import pytest
import torch
from conftest import make_batch, tiny_model, tiny_tokenizer

import pmod
from pmod.packing import IMAGE_TOKEN_INDEX


@pytest.fixture(scope="module")
def model():
    return tiny_model(layers=4)


def _batch(side="left"):
    ids, mask, n = make_batch([(3, 1, 4), (2, 1, 2)], side=side)
    return ids, mask, torch.randn(n, 3, 42, 42, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("call", ["forward", "generate"])
def test_token_ids_outside_the_vocabulary_are_named(model, call):
    ids, mask, pix = _batch()
    run = (lambda **kw: model(**kw)) if call == "forward" else (lambda **kw: model.generate(**kw, max_new_tokens=2))
    bad = ids.clone()
    bad[1, -1] = 120
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 97\): 120 at row 1, position 8"):
        run(input_ids=bad, images=pix, attention_mask=mask)
    bad[1, -1] = -1
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 97\): -1 at row 1"):
        run(input_ids=bad, images=pix, attention_mask=mask)
    bad = ids.clone()
    bad[1, 0] = 10_000  # under the padding of a left-padded row: never read, so allowed
    run(input_ids=bad, images=pix, attention_mask=mask)


def test_float_ids_and_bad_masks_are_named(model):
    ids, mask, pix = _batch()
    with pytest.raises(ValueError, match=r"input_ids must hold integer token ids, got dtype torch\.float32"):
        model(input_ids=ids.float(), images=pix, attention_mask=mask)
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 8\) but input_ids \(2, 9\)"):
        model(input_ids=ids, images=pix, attention_mask=mask[:, 1:])
    with pytest.raises(ValueError, match=r"attention_mask must hold 0 \(padding\) and 1 \(real token\) only, got \[2\]"):
        model(input_ids=ids, images=pix, attention_mask=mask * 2)
    zero = mask.clone()
    zero[1] = 0  # row 1 holds an image placeholder: the problem is the empty row, not the image count
    with pytest.raises(ValueError, match=r"attention_mask row\(s\) 1 are all 0"):
        model(input_ids=ids, images=pix, attention_mask=zero)
    with pytest.raises(ValueError, match=r"input_ids must be a torch\.Tensor"):
        model(input_ids=ids.tolist(), images=pix, attention_mask=mask)


def test_bad_pixels_are_named(model):
    ids, mask, pix = _batch()
    nan = pix.clone()
    nan[1, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match=r"images hold NaN or Inf pixel values \(image\(s\) 1\)"):
        model(input_ids=ids, images=nan, attention_mask=mask)
    with pytest.raises(ValueError, match=r"NaN or Inf"):
        model.generate(input_ids=ids, images=nan, attention_mask=mask, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"images has shape \(2, 3, 40, 40\); this model takes \[N, 3, S, S\] with S=42"):
        model(input_ids=ids, images=pix[..., :40, :40], attention_mask=mask)
    with pytest.raises(ValueError, match=r"floating pixel values.*torch\.uint8"):
        model(input_ids=ids, images=pix.to(torch.uint8), attention_mask=mask)


@pytest.mark.parametrize("kw,msg", [
    ({"top_k": -1, "do_sample": True}, r"top_k must be an integer >= 0.*-1"),
    ({"top_p": 1.5, "do_sample": True}, r"top_p must be in \(0, 1\].*1\.5"),
    ({"top_p": 0.0, "do_sample": True}, r"top_p must be in \(0, 1\]"),
    ({"temperature": float("nan"), "do_sample": True}, r"temperature must be a finite number, got nan"),
    ({"temperature": float("nan")}, r"temperature must be a finite number, got nan"),
    ({"temperature": 0.0, "do_sample": True}, r"temperature must be > 0 when sampling"),
    ({"do_sample": "yes"}, r"do_sample must be True or False"),
    ({"stop_strings": [""], "tokenizer": "tok"}, r"stop_strings\[0\] = '': each stop string must be a non-empty string"),
    ({"stop_strings": ["ok", 3], "tokenizer": "tok"}, r"stop_strings\[1\] = 3"),
    ({"stop_strings": ["x"]}, r"stop_strings need a tokenizer"),
    ({"max_new_tokens": 0}, r"max_new_tokens must be an integer >= 1, got 0"),
    ({"max_new_tokens": "8"}, r"max_new_tokens must be an integer >= 1, got '8'"),
    ({"eos_token_id": "2"}, r"eos_token_id must be a token id"),
])
def test_bad_generation_arguments_are_named(model, kw, msg):
    ids, mask, pix = _batch()
    kw = {"max_new_tokens": 2, **kw}
    if kw.get("tokenizer") == "tok":
        kw["tokenizer"] = tiny_tokenizer()
    with pytest.raises(ValueError, match=msg):
        model.generate(input_ids=ids, images=pix, attention_mask=mask, **kw)


def test_huge_max_new_tokens_is_refused_before_any_allocation(model, monkeypatch):
    ids, mask, pix = _batch()
    calls = []
    monkeypatch.setattr(pmod.cache.PmodCache, "__init__", lambda self, *a, **k: calls.append(k) or (_ for _ in ()).throw(
        AssertionError("a cache was allocated before the context check")))
    with pytest.raises(ValueError, match=r"\+ max_new_tokens \(1000000000\) exceeds the model's context of 512 tokens"):
        model.generate(input_ids=ids, images=pix, attention_mask=mask, max_new_tokens=10**9)
    assert calls == []


def test_nonfinite_logits_during_generation_raise(tmp_path):
    m = tiny_model(layers=4)
    ids, mask, pix = _batch()
    with torch.no_grad():
        m.lm_head.weight[5, 0] = float("nan")  # one bad weight: every row's logit 5 is NaN
    with pytest.raises(ValueError, match=r"non-finite logits \(NaN/Inf\) at generation step 0 in row\(s\) \[0, 1\]"):
        m.generate(input_ids=ids, images=pix, attention_mask=mask, max_new_tokens=4)
    with pytest.raises(ValueError, match=r"non-finite logits"):
        m.generate(input_ids=ids, images=pix, attention_mask=mask, max_new_tokens=1)


# --- routing.kept in merged positions ----------------------------------------------------------------------------
def _layouts():
    ids, mask, n = make_batch([(3, 1, 4), (1, 1, 1), (5, 1, 0)], side="left")
    yield "left", ids, mask, n
    ids, mask, n = make_batch([(3, 1, 4), (1, 1, 1), (5, 1, 0)], side="right")
    yield "right", ids, mask, n
    ids2 = torch.zeros(ids.shape[0], ids.shape[1] + 2, dtype=ids.dtype)  # padding on both sides of every row
    mask2 = torch.zeros_like(ids2)
    ids2[:, 1:-1], mask2[:, 1:-1] = ids, mask
    yield "both", ids2, mask2, n


@pytest.mark.parametrize("layout", ["left", "right", "both"])
def test_routing_kept_is_in_merged_positions(model, layout):
    name, ids, mask, n = next(x for x in _layouts() if x[0] == layout)
    pix = torch.randn(n, 3, 42, 42, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = model(input_ids=ids, images=pix, attention_mask=mask)
    assert out.routing
    for b in range(ids.shape[0]):
        real = mask[b].bool()
        with torch.no_grad():  # the row alone, unpadded: positions 0.. of its own merged sequence
            one = model(input_ids=ids[b : b + 1, real], images=pix[b : b + 1])
        off = int(out.attention_mask[b].float().argmax())
        for rec, rec1 in zip(out.routing, one.routing):
            kept = rec.kept[b][rec.kept[b] >= 0]
            assert out.vision_mask[b, kept].all() and out.attention_mask[b, kept].all()
            assert torch.equal(kept - off, rec1.kept[0][rec1.kept[0] >= 0])
            # the logits at a kept position are those of that token in the row run alone
            torch.testing.assert_close(out.logits[b, kept], one.logits[0, kept - off], rtol=1e-5, atol=1e-5)
