"""FLOPs / KV accounting at the released 7B shapes of LLaVA-OneVision and Qwen2.5-VL, from config.json alone.

The config.json files in tests/fixtures/configs/ carry the published shapes (llava-hf/llava-onevision-qwen2-7b-ov-hf,
Qwen/Qwen2.5-VL-7B-Instruct, Qwen/Qwen3-VL-8B-Instruct, in their transformers-4.x spelling); no weights are needed."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import pmod
from pmod.flops import count_flops, image_tokens, kv_cache_bytes

CONFIGS = Path(__file__).resolve().parent / "fixtures" / "configs"
OV, QWEN, QWEN3 = CONFIGS / "llava-onevision-qwen2-7b-ov-hf", CONFIGS / "qwen2.5-vl-7b-instruct", CONFIGS / "qwen3-vl-8b-instruct"
QWEN2_7B = (3584, 18944, 28, 28, 4, 128)  # hidden, intermediate, layers, heads, kv heads, head dim
QWEN3_8B = (4096, 12288, 36, 32, 8, 128)


def paper_flops(d, m, kv, L, V, tokens_per_layer, n):
    """The paper's convention, written out: 2 FLOPs per MAC over q, k, v, o (GQA: k, v at d x kv), gate, up, down, per
    layer at its token count, plus the lm_head over all n positions."""
    return sum(2 * t * (2 * d * d + 2 * d * kv + 3 * d * m) for t in tokens_per_layer) + 2 * n * d * V


def trunc_k(n, r):
    return int(torch.tensor(n, dtype=torch.int32) * r)


@pytest.mark.parametrize("folder, n_vision, size, shape, first_mod", [
    (OV, 7371, None, QWEN2_7B, 7), (QWEN, 576, None, QWEN2_7B, 7), (QWEN, 972, (1000, 750), QWEN2_7B, 7),
    (QWEN3, 441, None, QWEN3_8B, 9)])
def test_7b_flops_from_config(folder, n_vision, size, shape, first_mod):
    """Qwen2.5-VL: 1000x750 -> smart_resize 1008x756 -> a 36 x 27 grid of 28-px merged tokens = 972; Qwen3-VL merges
    32-px squares: 672x672 -> 21 x 21 = 441. The MoD layers: shiftedcos over L layers (L - 1 in the cosine)."""
    cfg = pmod.load_config(folder)
    t = cfg.text
    d, m, L, H, G, hd = shape
    assert (t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads,
            t.head_dim) == shape and cfg.is_dense
    assert image_tokens(cfg, size)[0] == n_vision
    conv = cfg.replace(mod=pmod.ModConfig())
    ratios = conv.mod_ratios
    assert sorted(ratios) == list(range(first_mod, L))
    n_text, V = 58, t.vocab_size
    dense = count_flops(cfg, n_vision=n_vision, n_text=n_text)
    pm = count_flops(conv, n_vision=n_vision, n_text=n_text)
    n = n_vision + n_text
    assert dense.total == paper_flops(d, m, G * hd, L, V, [n] * L, n)
    per_layer = [n_text + (trunc_k(n_vision, ratios[i]) if i in ratios else n_vision) for i in range(L)]
    assert pm.total == paper_flops(d, m, G * hd, L, V, per_layer, n) and pm.dense_total == dense.total
    kv = kv_cache_bytes(conv, n_vision=n_vision, n_text=n_text, convention="complete", dtype=torch.float16)
    assert kv.total == sum(per_layer) * 2 * G * hd * 2  # k and v, G kv heads of hd, 2 bytes


def test_flops_cli_as_pmod(capsys):
    from pmod.cli import main

    for folder, figures in ((OV, ("7371 vision tokens", "60.56 TFLOPs = 57.6 % of dense 105.05", "21 MoD layers")),
                            (QWEN, ("576 vision tokens", "5.48 TFLOPs = 61.2 % of dense 8.97", "21 MoD layers")),
                            (QWEN3, ("441 vision tokens", "4.72 TFLOPs = 62.4 % of dense 7.55", "27 MoD layers"))):
        assert main(["flops", "--model", str(folder), "--as-pmod"]) == 0
        out = capsys.readouterr().out
        assert all(f in out for f in figures), out
        assert "53.7 % (integer k)" in out


def test_qwen_vision_flops_are_refused_by_name():
    cfg = pmod.load_config(QWEN)
    with pytest.raises(ValueError, match="qwen2_5_vl"):
        count_flops(cfg, n_vision=576, n_text=58, convention="complete", include_vision=True, n_images=1)
