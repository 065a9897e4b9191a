"""GradNormLoRP: function unchanged at init, optimizer state of the projected size, projector refreshed only at
step % T == 0, updates of rank <= r, scale 0 keeps projected weights still, 8-bit states, exact merges."""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from test_peft_common import FINETUNE, batch, cfg, check_merged_and_reloaded, logits, prepared, run_steps

import pmod.peft as peft_strategies
from pmod.peft import optimizer_state_bytes, optimizer_state_bytes_8bit
from pmod.peft.galore import GaLoreAdamW, galore_state_elements


@pytest.mark.parametrize("mode", ["dora", "full"])
def test_function_unchanged_at_init(mode):
    b = batch()
    ref = logits(tiny_model(), b)
    model, _, _ = prepared("gradnormlorp", mode=mode, lora_r=4)
    assert torch.equal(logits(model, b), ref)


def test_full_mode_optimizer_state_is_the_projected_size():
    rank = 8
    model, s, opt = prepared("gradnormlorp", mode="full", rank=rank)
    run_steps(model, s, opt, 1)
    projected = s.projected_params(model)
    assert len(projected) == 28
    for n, p in projected.items():
        st = opt.state[p]
        got = st["exp_avg"].numel() + st["exp_avg_sq"].numel() + st["projector"].numel()
        assert got == galore_state_elements(*p.shape, rank) == 2 * rank * max(p.shape) + rank * min(p.shape), n
    others = sum(p.numel() for p in model.parameters() if p.requires_grad and all(p is not q for q in projected.values()))
    total = sum(galore_state_elements(*p.shape, rank) for p in projected.values()) + 2 * others
    assert sum(v.numel() for st in opt.state.values() for v in st.values() if torch.is_tensor(v)) == total
    assert optimizer_state_bytes(opt) == 4 * total
    # the paper's example: a 4096 x 4096 matrix at r = 128 keeps 4.7 % of AdamW's state
    assert galore_state_elements(4096, 4096, 128) / (2 * 4096**2) == pytest.approx(0.0469, abs=1e-4)


def test_projector_changes_only_every_t_steps_and_updates_have_rank_at_most_r():
    rank, T = 4, 3
    model, s, opt = prepared("gradnormlorp", mode="full", rank=rank, update_proj_gap=T, scale=1.0)
    p = next(iter(s.projected_params(model).values()))
    projectors, ranks = [], []
    before = {}

    def watch(step, when):
        if when == "after_backward":
            before["w"] = p.detach().clone()
        else:
            projectors.append(opt.state[p]["projector"].clone())
            ranks.append(int(torch.linalg.matrix_rank(p.detach() - before["w"], rtol=1e-4)))

    run_steps(model, s, opt, 7, on_step=watch)
    for step in range(1, 7):
        assert torch.equal(projectors[step], projectors[step - 1]) == (step % T != 0), step
    assert max(ranks) <= rank and min(ranks) >= 1  # weight decay 0: each update lies in the rank-r subspace


def test_scale_zero_leaves_projected_parameters_still():
    model, s, opt = prepared("gradnormlorp", mode="full", rank=4, scale=0.0)
    projected = {n: p.detach().clone() for n, p in s.projected_params(model).items()}
    mag = next(p for n, p in model.named_parameters() if n.endswith(".magnitude")).detach().clone()
    run_steps(model, s, opt, 3)
    for n, p in s.projected_params(model).items():
        assert torch.equal(p, projected[n]), n
    assert not torch.equal(next(p for n, p in model.named_parameters() if n.endswith(".magnitude")), mag)  # g still trains


def test_dora_mode_projects_the_factors_and_uses_peft_dora():
    model, s, opt = prepared("gradnormlorp", lora_r=4, rank=2)
    names = set(s.projected_params(model))
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert any(".lora_magnitude_vector." in n for n in s.adapter_params(model))
    run_steps(model, s, opt, 2)
    a = next(p for n, p in model.named_parameters() if n.endswith("q_proj.lora_A.default.weight"))
    assert opt.state[a]["exp_avg"].shape == (2, 64)  # A [4, 64]: projected on the left to [2, 64]


@pytest.mark.parametrize("mode", ["dora", "full"])
def test_merge_and_reload_give_the_unmerged_logits(mode, tmp_path):
    b = batch()
    model, s, opt = prepared("gradnormlorp", mode=mode, lora_r=4, rank=4, scale=1.0)
    run_steps(model, s, opt, 3)
    ref = logits(model, b)
    check_merged_and_reloaded(model, s, b, tmp_path)
    s.merge(model)
    assert (logits(model, b) - ref).abs().max() <= 1e-5


def test_8bit_states_hold_what_the_analytic_count_says():
    pytest.importorskip("bitsandbytes")
    model, s, opt = prepared("gradnormlorp", mode="full", rank=8, optim_bits=8)
    ref_model, ref_s, ref_opt = prepared("gradnormlorp", mode="full", rank=8)
    run_steps(model, s, opt, 3)
    run_steps(ref_model, ref_s, ref_opt, 3)
    assert any(v.dtype == torch.uint8 for st in opt.state.values() for v in st.values() if torch.is_tensor(v))
    assert optimizer_state_bytes(opt) == optimizer_state_bytes_8bit(ref_opt)  # measured 8-bit == analytic from 32-bit
    assert optimizer_state_bytes(opt) < optimizer_state_bytes(ref_opt)  # tiny: only moments >= 4096 elements go 8-bit
    # 8-bit moments track the 32-bit run closely over a few steps
    for (k, a), r in zip(model.state_dict().items(), ref_model.state_dict().values()):
        assert (a - r).abs().max() <= 0.05 * (r.abs().max() + 1e-3), k


def test_8bit_without_bitsandbytes_support_is_a_clear_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    with pytest.raises(RuntimeError, match="8-bit optimizer states need bitsandbytes"):
        GaLoreAdamW([torch.nn.Parameter(torch.zeros(4, 4))], bits=8)


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="mode: dora or full"):
        peft_strategies.get_strategy("gradnormlorp", mode="galore")
    with pytest.raises(ValueError, match="optim_bits: 8 or 32"):
        peft_strategies.get_strategy("gradnormlorp", optim_bits=4)
    s = peft_strategies.get_strategy("gradnormlorp", mode="full")
    model = tiny_model()
    s.prepare(model, FINETUNE)
    with pytest.raises(ValueError, match="already adapted"):
        s.adapt(model)
    assert isinstance(s.build_optimizer(model, cfg()), GaLoreAdamW)
