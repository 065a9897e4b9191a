from __future__ import annotations

import json

import pytest

from pmod.config import ModConfig, PmodConfig, TextConfig
from pmod.io.legacy import official_ratios, parse_router_norm, parse_schedule
from pmod.schedule import kept_count, prd_schedule


def test_official_32_layer_schedule(official_dir):
    ref = json.loads((official_dir / "manifest.json").read_text())["schedule"]
    sched = prd_schedule(32)
    assert list(sched) == ref["mod_layer_indices"]
    assert list(sched.values()) == ref["ratio_per_mod_layer"]  # bit-exact: L-1 = 31
    assert sched == official_ratios("shiftedcos", 32, 0.5, 0.85, 0.15)


def test_spec_kept_counts_at_576():
    ks = [kept_count(576, r) for r in prd_schedule(32).values()]
    assert ks[:16] == [486, 464, 440, 414, 388, 360, 331, 302, 273, 244, 215, 187, 161, 135, 111, 89]
    assert set(ks[16:]) == {86}


@pytest.mark.parametrize("L", [8, 24, 28, 40, 80])
def test_other_depths_are_sensible(L):
    s = prd_schedule(L)
    layers, ratios = list(s), list(s.values())
    assert layers == list(range(layers[0], L))  # a dense prefix, then every deeper layer routes
    assert layers[0] == min(i for i in range(L) if 0.5 + 0.5 * __import__("math").cos(i * __import__("math").pi / (L - 1)) <= 0.85)
    assert all(a >= b for a, b in zip(ratios, ratios[1:]))  # non-increasing
    assert max(ratios) <= 0.85 and min(ratios) == 0.15 and ratios[-1] == 0.15
    # the dense prefix is the same fraction of depth as the official 8/32
    assert abs(layers[0] / (L - 1) - 8 / 31) < 1.5 / (L - 1)


def test_linear_and_constant_kinds():
    lin = prd_schedule(32, "shiftedlinear")
    assert all(0.15 <= r <= 0.85 for r in lin.values())
    assert list(prd_schedule(10, "deep_all", avg_ratio=0.3)) == list(range(2, 9))
    assert list(prd_schedule(10, "deep_all_include_last")) == list(range(2, 10))
    assert list(prd_schedule(10, "interleave")) == [1, 3, 5, 7, 9]
    assert prd_schedule(10, "none") == {}


def test_kept_count_is_float32_trunc():
    assert kept_count(25, 0.8444834595378433) == 21
    assert kept_count(0, 0.5) == 0
    assert kept_count(2928, 0.15) == 439


@pytest.mark.parametrize("bad", [dict(min_ratio=0.0), dict(max_ratio=1.2), dict(min_ratio=0.9, max_ratio=0.5)])
def test_bad_ratios_rejected(bad):
    with pytest.raises(ValueError, match="ratio"):
        ModConfig(**bad)


def test_bad_layer_ratio_and_layers():
    with pytest.raises(ValueError, match=r"outside \(0, 1\]"):
        ModConfig(layer_ratios={3: 1.5})
    with pytest.raises(ValueError, match="outside 0..3"):
        PmodConfig(text=TextConfig(num_hidden_layers=4, hidden_size=64, num_attention_heads=4, vocab_size=10, intermediate_size=32),
                   mod=ModConfig(layer_ratios={7: 0.5}))


@pytest.mark.parametrize("s", ["cosine_decay_0.8_0.1", "shiftedcos_decay_a_b", "shiftedcos", ""])
def test_unparsable_schedule_string(s):
    with pytest.raises(ValueError, match="cannot parse mod_target_layers"):
        parse_schedule(s)


def test_legacy_strings():
    assert parse_schedule("shiftedcos_decay_0.85_0.15") == {"schedule": "shiftedcos", "max_ratio": 0.85, "min_ratio": 0.15}
    assert parse_router_norm("tanh_0.2_1") == {"norm": "tanh", "norm_scale": 0.2, "norm_bias": 1.0}
    assert parse_router_norm("sigmoid") == {"norm": "sigmoid", "norm_scale": 1.0, "norm_bias": 1.0}
    with pytest.raises(ValueError, match="mod_weight_norm"):
        parse_router_norm("relu_1_1")
