"""Bone (peft MiSS "bat") and MiSS: r·out parameters per linear, unchanged at init, the forward equals the closed
form written out block by block, merge / unmerge round trip, and a clear error when r does not divide."""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from test_peft_common import FINETUNE, batch, check_merged_and_reloaded, logits, prepared, run_steps

import pmod.peft as peft_strategies
from pmod.peft import target_linears


def _bat_reference(w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """W'_jk = W_jk + W_jk B_j + B_j on every r×r block, by explicit loops."""
    r = b.shape[-1]
    out = w.clone()
    for j in range(w.shape[0] // r):
        for k in range(w.shape[1] // r):
            blk = w[j * r:(j + 1) * r, k * r:(k + 1) * r]
            out[j * r:(j + 1) * r, k * r:(k + 1) * r] = blk + blk @ b[j] + b[j]
    return out


def _miss_reference(w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """W'[o, i] = W[o, i] + B[i mod r, o]."""
    out = w.clone()
    for i in range(w.shape[1]):
        out[:, i] += b[i % b.shape[0]]
    return out


@pytest.mark.parametrize("name,r", [("bone", 16), ("bone", 32), ("miss", 16), ("miss", 24)])
def test_parameter_count_init_and_closed_form(name, r):
    b = batch()
    ref = logits(tiny_model(), b)
    model, s, _ = prepared(name, r=r)
    assert torch.equal(logits(model, b), ref)  # B = 0 at init
    linears = target_linears(tiny_model())
    assert sum(p.numel() for p in s.adapter_params(model).values()) == sum(r * m.out_features for m in linears.values())
    torch.manual_seed(1)
    for layer in s.adapted_modules(model).values():
        blk = layer.miss_block["default"]
        with torch.no_grad():
            blk.normal_(0, 0.1)
        w = layer.get_base_layer().weight.detach()
        expected = (_bat_reference if name == "bone" else _miss_reference)(w, blk.detach())
        x = torch.randn(3, w.shape[1])
        with torch.no_grad():
            assert torch.allclose(layer(x), x @ expected.T, atol=1e-5)


@pytest.mark.parametrize("name", ["bone", "miss"])
def test_merge_unmerge_round_trip_and_merged_logits(name, tmp_path):
    b = batch()
    model, s, opt = prepared(name, r=16)
    run_steps(model, s, opt, 3)
    check_merged_and_reloaded(model, s, b, tmp_path)
    layer = next(iter(s.adapted_modules(model).values()))
    w0 = layer.get_base_layer().weight.detach().clone()
    closed = s.merge_linear(dict(layer.state_dict()))["weight"]
    with torch.no_grad():
        layer.merge()
        assert torch.allclose(layer.get_base_layer().weight, closed, atol=1e-6)  # peft's merge == our closed form
        layer.unmerge()
    assert torch.allclose(layer.get_base_layer().weight, w0, atol=1e-5)


def test_mini_variant_shares_a_small_block():
    model, s, _ = prepared("miss", r=16, init="mini", mini_r=8)
    assert {tuple(p.shape) for p in s.adapter_params(model).values()} == {(16, 8)}


def test_divisibility_errors_name_the_layers():
    with pytest.raises(ValueError, match=r"'bone' needs r=64 to divide both in and out features .*self_attn\.k_proj \[32x64\]"):
        peft_strategies.get_strategy("bone").prepare(tiny_model(), FINETUNE)  # default r = 64; k_proj is 32 x 64
    with pytest.raises(ValueError, match=r"'miss' needs r=100 <= in features"):
        peft_strategies.get_strategy("miss", r=100).prepare(tiny_model(), FINETUNE)
