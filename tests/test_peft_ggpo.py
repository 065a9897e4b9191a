"""LoRA-GGPO and LoRA-MGPO: the perturbation follows the formula, exists only in training forwards after step 0,
is gone after the step (base weights bitwise restored), and with zero strength the run is plain LoRA bit for bit."""
from __future__ import annotations

import math

import pytest
import torch
from test_peft_common import batch, logits, prepared, run_steps

from pmod.peft.ggpo import lora_delta_grad


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name,zero", [("lora-ggpo", {"sigma": 0.0, "beta": 0.0}), ("lora-mgpo", {"rho": 0.0, "adam_beta1": 0.9})])
def test_zero_strength_is_plain_lora_bit_for_bit_without_consuming_rng(name, zero):
    plain, sp, op = prepared("lora", r=4, alpha=8)
    torch.manual_seed(123)
    run_steps(plain, sp, op, 4)
    rng_plain = torch.get_rng_state()
    pert, spert, opert = prepared(name, r=4, alpha=8, **zero)
    torch.manual_seed(123)
    run_steps(pert, spert, opert, 4)
    assert torch.equal(torch.get_rng_state(), rng_plain)
    for (k, a), b in zip(plain.state_dict().items(), pert.state_dict().values()):
        assert torch.equal(a, b), k


def test_ggpo_coefficients_and_perturbation_follow_the_formula():
    model, s, opt = prepared("lora-ggpo", r=4, alpha=8, dropout=0.0, sigma=0.5, beta=0.3)
    b = batch()
    assert not s.coef  # step 0: no statistics, so no perturbation
    with s.forward_context(model):
        assert torch.equal(logits(model.train(), b), logits(model.eval(), b))
    run_steps(model, s, opt, 1)
    # recompute c from this step's gradients by hand
    model.train()
    s.on_step_begin(1, model, opt)
    with s.forward_context(model):
        out = model(input_ids=b["input_ids"], images=b["images"], attention_mask=b["attention_mask"], labels=b["labels"])
        out.loss.backward()
    name, layer = next(iter(s._lora.items()))
    A, B, W0 = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.get_base_layer().weight
    sc = 8 / 4
    combined = torch.sqrt(W0.norm(dim=1).mean() ** 2 + (sc * B @ A).norm(dim=1) ** 2)
    gnorm = (sc * (B @ A.grad + B.grad @ A)).norm(dim=1)
    expected = (0.5 * combined + 0.3 * gnorm**2) / math.sqrt(W0.shape[1])
    assert torch.allclose(s.noise_coefficients(layer), expected, rtol=1e-5, atol=1e-7)
    # the hook adds exactly x (E ⊙ c)ᵀ with E from the (seed, step, layer) generator
    s.after_backward(model)
    opt.zero_grad(set_to_none=True)
    x = torch.randn(5, layer.in_features)
    with torch.no_grad():
        clean = layer(x)
        with s.forward_context(model):
            noisy = layer(x)
        gen = torch.Generator().manual_seed((s.seed * 1_000_003 + s.step) * 100_003 + 0)
        e = torch.randn(W0.shape, generator=gen)
        assert torch.allclose(noisy - clean, (x @ e.T) * s.coef[name], atol=1e-5)
        model.eval()
        with s.forward_context(model):
            assert torch.equal(layer(x), clean)  # no perturbation in eval


def test_ggpo_trains_only_adapters_and_roles_and_keeps_base_weights():
    model, s, opt = prepared("lora-ggpo", r=4, sigma=0.5, beta=0.5)
    w0 = _weights(model)
    run_steps(model, s, opt, 3)
    assert len(s.coef) == 28
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for k, v in model.state_dict().items():
        assert torch.equal(v, w0[k]) == (k not in trainable), k


def test_mgpo_epsilon_follows_the_formula_and_base_weights_are_restored_each_step():
    model, s, opt = prepared("lora-mgpo", r=4, alpha=8, rho=0.05)
    assert opt.param_groups[0]["betas"][0] == 0.8
    w0 = _weights(model)
    seen = []

    def check(step: int, when: str) -> None:
        if when == "after_step":
            for k, v in model.state_dict().items():
                if "base_layer" in k:
                    assert torch.equal(v, w0[k]), f"{k} not restored after step {step}"
            seen.append(step)

    run_steps(model, s, opt, 3, on_step=check)
    assert seen == [0, 1, 2] and len(s.gbar) == 28
    # step 3: the perturbation applied at on_step_begin is −ρ V/‖V‖ min(1/ḡ, 10)
    name, layer = next(iter(s._lora.items()))
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    mA, mB = opt.state[A]["exp_avg"], opt.state[B]["exp_avg"]
    V = 2.0 * (mB @ A + B @ mA)
    eps = -0.05 * V / V.norm() * min(1 / s.gbar[name], 10.0)
    base = layer.get_base_layer().weight.detach().clone()
    s.on_step_begin(3, model, opt)
    assert torch.allclose(layer.get_base_layer().weight - base, eps, atol=1e-7)
    s.restore()
    assert torch.equal(layer.get_base_layer().weight, base)


def test_mgpo_gbar_is_an_ema_of_the_delta_gradient_norm_and_step_0_is_clean():
    model, s, opt = prepared("lora-mgpo", r=4, alpha=8, ema=0.5)
    s.on_step_begin(0, model, opt)
    assert not s._snapshot  # no Adam moments yet: no perturbation at step 0
    norms = []
    first_layer = next(iter(s._lora.values()))
    orig = s.after_backward

    def spy(m):
        norms.append(float(lora_delta_grad(first_layer, s.scaling).norm()))
        orig(m)

    s.after_backward = spy
    run_steps(model, s, opt, 3)
    name = next(iter(s._lora))
    expected = norms[0]
    for g in norms[1:]:
        expected = 0.5 * expected + 0.5 * g
    assert s.gbar[name] == pytest.approx(expected, rel=1e-6)
