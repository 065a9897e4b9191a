"""Grokking tickets as sparse fine-tuning: the mask keeps exactly the requested fraction by global magnitude,
rewinding restores the initial weights, pruned entries never move, save / load, and the random control."""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from test_peft_common import FINETUNE, batch, logits, prepared, run_steps

import pmod.peft as peft_strategies
from pmod.peft.ticket import density, magnitude_mask, random_mask


def test_magnitude_mask_keeps_the_requested_fraction_globally_with_deterministic_ties():
    g = torch.Generator().manual_seed(0)
    scores = {"a": torch.randn(7, 13, generator=g).abs(), "b": torch.randn(29, generator=g).abs(), "c": torch.zeros(5, 3)}
    for keep in (0.1, 0.4, 0.77, 1.0):
        m = magnitude_mask(scores, keep)
        total = sum(s.numel() for s in scores.values())
        assert sum(int(x.sum()) for x in m.values()) == round(keep * total)
        kept = torch.cat([scores[k][m[k]] for k in scores])
        pruned = torch.cat([scores[k][~m[k]] for k in scores])
        assert pruned.numel() == 0 or kept.min() >= pruned.max()
    ties = {"x": torch.ones(4), "y": torch.ones(4)}
    m = magnitude_mask(ties, 0.5)  # equal scores: the earlier positions win, every time
    assert m["x"].all() and not m["y"].any()
    r = random_mask(scores, 0.4, seed=3)
    assert density(r) == round(0.4 * total) / total and torch.equal(r["a"], random_mask(scores, 0.4, seed=3)["a"])
    with pytest.raises(ValueError, match="fraction of weights kept"):
        magnitude_mask(scores, 0.0)


def _trained_checkpoint(tmp_path):
    """A 'trained' model: the tiny model after a few full fine-tuning steps."""
    model, s, opt = prepared("full")
    run_steps(model, s, opt, 3)
    model.save_pretrained(tmp_path / "trained")
    return tmp_path / "trained", model


def test_delta_mode_scores_the_change_rewinds_and_never_moves_pruned_entries(tmp_path):
    trained_dir, trained = _trained_checkpoint(tmp_path)
    model, s, opt = prepared("ticket", mask_from=str(trained_dir), keep=0.25)
    init = tiny_model()
    w = s.weights(model)
    for n, p in w.items():  # rewound: the run's start (W_0) exactly
        assert torch.equal(p, init.get_parameter(n)), n
    assert density(s.masks) == pytest.approx(0.25, abs=1e-6)
    delta = {n: (trained.get_parameter(n) - init.get_parameter(n)).abs() for n in w}
    kept = torch.cat([delta[n][s.masks[n]] for n in w])
    pruned = torch.cat([delta[n][~s.masks[n]] for n in w])
    assert kept.min() >= pruned.max()
    assert opt.param_groups[0]["betas"] == (0.9, 0.98) and opt.param_groups[0]["weight_decay"] == 0.0
    run_steps(model, s, opt, 4)
    for n, p in s.weights(model).items():
        m = s.masks[n]
        assert torch.equal(p[~m], init.get_parameter(n)[~m]), n  # pruned entries never changed
        assert not torch.equal(p[m], init.get_parameter(n)[m]), n


def test_weights_mode_prunes_to_w_init_times_mask(tmp_path):
    trained_dir, trained = _trained_checkpoint(tmp_path)
    model, s, opt = prepared("ticket", mask_from=str(trained_dir / "model.safetensors"), mode="weights", keep=0.4)
    init = tiny_model()
    for n, p in s.weights(model).items():
        assert torch.equal(p, init.get_parameter(n) * s.masks[n]), n
    all_scores = torch.cat([trained.get_parameter(n).abs()[s.masks[n]] for n in s.masks])
    all_pruned = torch.cat([trained.get_parameter(n).abs()[~s.masks[n]] for n in s.masks])
    assert all_scores.min() >= all_pruned.max()
    run_steps(model, s, opt, 2)
    assert all(torch.equal(p[~s.masks[n]], torch.zeros_like(p[~s.masks[n]])) for n, p in s.weights(model).items())


def test_save_load_and_merge_of_a_ticket(tmp_path):
    b = batch()
    model, s, opt = prepared("ticket", random=True, keep=0.3, seed=5)
    run_steps(model, s, opt, 3)
    s.save(model, tmp_path)
    assert (tmp_path / "strategy" / "mask.safetensors").is_file()
    again, s2 = peft_strategies.load_trained(tiny_model(), tmp_path)
    assert torch.equal(logits(again, b), logits(model, b))
    assert all(torch.equal(s2.masks[n], s.masks[n]) for n in s.masks)
    assert s.merge_state(dict(model.state_dict())).keys() == tiny_model().state_dict().keys()
    assert s.touched(model)["adapter"] == round(0.3 * sum(m.numel() for m in s.masks.values()))


def test_option_errors(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(ValueError, match="mask_from: a trained checkpoint"):
        peft_strategies.get_strategy("ticket")
    with pytest.raises(ValueError, match="weight_decay: must be 0 in delta mode"):
        peft_strategies.get_strategy("ticket", random=True, weight_decay=0.1)
    save_file({"a": torch.zeros(1)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="lacks 28 target weight"):
        peft_strategies.get_strategy("ticket", mask_from=str(tmp_path / "x.safetensors")).prepare(tiny_model(), FINETUNE)
