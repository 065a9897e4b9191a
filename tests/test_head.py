"""The output head (`pmod.modeling.head`): full logits written into the padded result, positions, the reference path."""
from __future__ import annotations

import pytest
import torch
from conftest import make_batch, tiny_model
from torch import nn

from pmod.modeling import head

ROWS = [(3, 1, 5), (6, 0, 2), (1, 1, 9), (4, 2, 3)]  # unequal lengths: padded rows in the merged output


def _hidden(side: str, rows=ROWS):
    """A batch's final hidden states h [N, C] and layout, from the tiny p-MoD model."""
    model = tiny_model(layers=4)
    ids, mask, n = make_batch(rows, side=side)
    pix = torch.randn(n, 3, 42, 42, generator=torch.Generator().manual_seed(2)) if n else None
    with torch.no_grad():
        x, layout = model.prepare(ids, pix, None, mask)
        h = torch.randn(x.shape[0], x.shape[1], generator=torch.Generator().manual_seed(5))
    return model, h, layout


def _reference(model, h, layout):
    """The path the head replaced: GEMM, float cast, padding copy."""
    return layout.pad(model.lm_head(h).float())


@pytest.mark.parametrize("side", ["right", "left"])
def test_all_equals_the_padding_copy_exactly(side):
    model, h, layout = _hidden(side)
    with torch.no_grad():
        got = head.output_logits(model.lm_head, h, layout, "all")
    ref = _reference(model, h, layout)
    assert got.shape == ref.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)  # per-row GEMMs of the same rows
    assert torch.equal(got[~layout.merged_mask()], torch.zeros_like(got[~layout.merged_mask()]))  # padding is 0
    assert torch.equal(head.output_logits(model.lm_head, h, layout, 0), got)  # k = 0: all, as in transformers


def test_all_without_padding_is_one_gemm_and_bitwise():
    model, h, layout = _hidden("right", rows=[(2, 1, 3)])
    with torch.no_grad():
        got = head.output_logits(model.lm_head, h, layout, "all")
    assert torch.equal(got, _reference(model, h, layout))


def test_all_in_bfloat16_and_with_grad_follows_the_reference():
    model, h, layout = _hidden("left")
    bf = nn.Linear(h.shape[1], model.lm_head.out_features, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        bf.weight.copy_(model.lm_head.weight)
        got = head.output_logits(bf, h.bfloat16(), layout, "all")
    ref = layout.pad(bf(h.bfloat16()).float())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-2, atol=1e-2)  # bf16 GEMMs of row subsets: rounding may differ
    hg = h.clone().requires_grad_()
    out = head.output_logits(model.lm_head, hg, layout, "all")  # autograd: the differentiable reference path
    out.sum().backward()
    assert hg.grad is not None and torch.allclose(out.detach(), _reference(model, h, layout))


@pytest.mark.parametrize("side", ["right", "left"])
def test_positions_equal_all_at_those_positions(side):
    model, h, layout = _hidden(side)
    M = layout.merged_len
    with torch.no_grad():
        full = head.output_logits(model.lm_head, h, layout, "all")
        shared = head.output_logits(model.lm_head, h, layout, [0, 3, M - 1, -2])
        per_row = head.output_logits(model.lm_head, h, layout, torch.tensor([[1, 2], [0, 5], [M - 1, 4], [3, 3]]))
        ragged = head.output_logits(model.lm_head, h, layout, [[1], [0, 5, 6], [M - 1], [2, 3]])
    torch.testing.assert_close(shared, full[:, [0, 3, M - 1, M - 2]], rtol=1e-6, atol=1e-6)
    rows = torch.tensor([[1, 2], [0, 5], [M - 1, 4], [3, 3]])
    torch.testing.assert_close(per_row, torch.stack([full[b, rows[b]] for b in range(4)]), rtol=1e-6, atol=1e-6)
    assert ragged.shape == (4, 3, full.shape[-1])
    torch.testing.assert_close(ragged[1], full[1, [0, 5, 6]], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ragged[3, :2], full[3, [2, 3]], rtol=1e-6, atol=1e-6)
    assert not ragged[3, 2].any() and not ragged[0, 1:].any()  # ragged rows padded with 0 at the end


@pytest.mark.parametrize("side", ["right", "left"])
def test_int_keeps_each_rows_last_tokens(side):
    model, h, layout = _hidden(side)
    k, lens = 4, layout.varlen.lens
    with torch.no_grad():
        full = head.output_logits(model.lm_head, h, layout, "all")
        last = head.output_logits(model.lm_head, h, layout, k)
        one = head.output_logits(model.lm_head, h, layout, 1)
        lastv = head.output_logits(model.lm_head, h, layout, "last")
        longk = head.output_logits(model.lm_head, h, layout, max(lens) + 2)
    real = layout.merged_mask()
    for b in range(layout.batch_size):
        torch.testing.assert_close(last[b], full[b][real[b]][-k:], rtol=1e-6, atol=1e-6)
        assert not longk[b, : max(lens) + 2 - lens[b]].any()  # shorter rows: 0 before their first token
        torch.testing.assert_close(longk[b, -lens[b]:], full[b][real[b]], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(one[:, 0], lastv, rtol=1e-6, atol=1e-6)
    if side == "left":
        torch.testing.assert_close(last, full[:, -k:], rtol=1e-6, atol=1e-6)


def test_bad_logits_to_keep_is_named():
    model, h, layout = _hidden("right")
    M = layout.merged_len
    for bad, match in [("everything", "logits_to_keep='everything'"), (-1, ">= 0"), (True, ">= 0"),
                       ([M], "outside the merged sequence"), ([[0], [1]], "for 2 rows"),
                       (torch.tensor([0.5]), "integer positions"), ([0, [1]], "mixes"), ([], "non-empty")]:
        with pytest.raises(ValueError, match=match):
            head.output_logits(model.lm_head, h, layout, bad)


def test_model_forward_accepts_positions():
    model = tiny_model(layers=4)
    ids, mask, n = make_batch(ROWS, side="left")
    pix = torch.randn(n, 3, 42, 42, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(input_ids=ids, images=pix, attention_mask=mask).logits
        some = model(input_ids=ids, images=pix, attention_mask=mask, logits_to_keep=[[1, 2]] * 4).logits
        k = model(input_ids=ids, images=pix, attention_mask=mask, logits_to_keep=3).logits
    torch.testing.assert_close(some, full[:, [1, 2]], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(k, full[:, -3:], rtol=1e-6, atol=1e-6)  # left padding: the last 3 merged positions
