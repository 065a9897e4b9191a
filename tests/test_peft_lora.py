"""LoRA (peft on our plain nn.Module): unchanged at init, r·(in+out) per linear, exact merge, save -> load."""
from __future__ import annotations

import json

import torch
from conftest import tiny_model
from safetensors.torch import load_file
from test_peft_common import batch, logits, prepared, run_steps

import pmod.peft as peft_strategies
from pmod.peft import target_linears


def _randomise_b(model, std: float = 0.05) -> None:
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, std)


def test_output_unchanged_at_init_and_parameter_count():
    b = batch()
    ref = logits(tiny_model(), b)
    model, strategy, _ = prepared("lora", r=4, alpha=8)
    assert torch.equal(logits(model, b), ref)
    linears = target_linears(tiny_model())
    assert len(linears) == 4 * 7
    expected = sum(4 * (m.in_features + m.out_features) for m in linears.values())
    assert sum(p.numel() for p in strategy.adapter_params(model).values()) == expected
    assert strategy.touched(model)["adapter"] == expected


def test_merge_gives_the_unmerged_logits_and_a_plain_model(tmp_path):
    b = batch()
    model, strategy, opt = prepared("lora", r=4, alpha=8)
    run_steps(model, strategy, opt, 2)
    _randomise_b(model)
    before = logits(model, b)
    state = strategy.merge_state(dict(model.state_dict()))
    assert not any("lora_" in k or "base_layer" in k for k in state)
    plain = tiny_model()
    plain.load_state_dict(state)  # strict: exactly the base model's keys
    assert (logits(plain, b) - before).abs().max() <= 1e-5
    strategy.merge(model)
    assert all(type(m) is torch.nn.Linear for m in target_linears(model).values())
    assert not hasattr(model.language_model, "peft_config")
    assert (logits(model, b) - before).abs().max() <= 1e-5


def test_save_then_load_gives_identical_logits_and_a_peft_adapter(tmp_path):
    b = batch()
    model, strategy, opt = prepared("lora", r=4, alpha=8)
    run_steps(model, strategy, opt, 2)
    _randomise_b(model)
    strategy.save(model, tmp_path)
    meta = json.loads((tmp_path / "strategy" / "strategy.json").read_text())
    assert meta["strategy"] == "lora" and meta["options"]["r"] == 4 and meta["touched"]["router"] > 0
    peft_files = tmp_path / "strategy" / "adapter"
    assert json.loads((peft_files / "adapter_config.json").read_text())["r"] == 4
    assert any(k.endswith("lora_A.weight") for k in load_file(peft_files / "adapter_model.safetensors"))
    fresh, _ = peft_strategies.load_trained(tiny_model(), tmp_path)
    assert torch.equal(logits(fresh, b), logits(model, b))
    merged, _ = peft_strategies.load_trained(tiny_model(), tmp_path, merge=True)
    assert (logits(merged, b) - logits(model, b)).abs().max() <= 1e-5


def test_only_adapters_and_always_trained_roles_move():
    model, strategy, opt = prepared("lora", r=4)
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    run_steps(model, strategy, opt, 3)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for k, v in model.state_dict().items():
        assert torch.equal(v, w0[k]) == (k not in trainable), k  # frozen: bitwise still; trainable: moved


def test_default_rank_is_sized_to_the_decoder(tmp_path):
    """r = 64 (LLaVA's) from 1024 wide up; on the 64-wide tiny decoder r = 4, not 64 (which would train as many
    parameters as the linears it adapts); the saved strategy records the r that trained and reloads with it."""
    from pmod.peft.lora import default_rank

    assert [default_rank(d) for d in (4096, 1024, 512, 128, 64, 32)] == [64, 64, 32, 8, 4, 4]
    model, strategy, _ = prepared("lora")
    linears = target_linears(tiny_model())
    added = strategy.touched(model)["adapter"]
    assert strategy.r == 4 and added == sum(4 * (m.in_features + m.out_features) for m in linears.values())
    assert added < 0.2 * sum(m.in_features * m.out_features for m in linears.values())
    strategy.save(model, tmp_path)
    assert json.loads((tmp_path / "strategy" / "strategy.json").read_text())["options"]["r"] == 4
    again, loaded = peft_strategies.load_trained(tiny_model(), tmp_path)
    assert loaded.r == 4 and loaded.touched(again)["adapter"] == added


def test_an_explicit_rank_as_large_as_the_linears_is_warned_about():
    import pytest

    with pytest.warns(UserWarning, match=r"r=32 on a 64-wide decoder trains .* saves nothing \(default here: r=4\)"):
        prepared("lora", r=32)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prepared("lora", r=4)  # a rank that fits is not warned about
