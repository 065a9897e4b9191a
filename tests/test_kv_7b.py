"""KV cache of the default p-MoD schedule vs dense at LLaVA-NeXT-7B shapes, measured from the cache object.

Built on the meta device: shapes and per-layer lengths are real, no memory is used.
"""
from __future__ import annotations

import pytest
import torch

import pmod
from pmod.config import ModConfig, PmodConfig
from pmod.flops import kv_cache_bytes


def next_7b(mod: ModConfig) -> PmodConfig:
    return PmodConfig.from_name("llava-next-7b", mod=mod)


def measured_cache(mod: ModConfig, n_text: int = 58):
    with torch.device("meta"):
        model = pmod.PmodForConditionalGeneration(next_7b(mod)).to(torch.float16)
    ids = torch.randint(3, 32000, (1, n_text + 1))
    ids[0, 20] = pmod.IMAGE_TOKEN_INDEX
    images = [torch.zeros(5, 3, 336, 336, device="meta")]  # a square image: 2x2 grid + base
    with torch.no_grad():
        out = model(input_ids=ids, images=images, image_sizes=[(672, 672)], use_cache=True, logits_to_keep="none")
    return out.past_key_values, sum(out.layout.n_vision)


@pytest.mark.parametrize("n_text", [58])
def test_kv_bytes_pmod_vs_dense_at_next_7b(n_text):
    pm, n_vision = measured_cache(ModConfig(), n_text)
    dense, _ = measured_cache(ModConfig(schedule="none"), n_text)
    assert n_vision == 2928  # 576 base + 48 x 49 (newline) for a 2x2 grid
    per_token = 2 * 32 * 128 * 2  # k + v, 32 kv heads, head dim 128, fp16
    assert dense.nbytes() == 32 * (n_vision + n_text) * per_token
    text_bytes = 32 * n_text * per_token
    vision_ratio = (pm.nbytes() - text_bytes) / (dense.nbytes() - text_bytes)
    total_ratio = pm.nbytes() / dense.nbytes()
    cfg = next_7b(ModConfig())
    # measured == accounted (integer k); the paper's 53.8 % uses the fractional ratios (53.75 %)
    assert vision_ratio == pytest.approx(kv_cache_bytes(cfg, n_vision, n_text, convention="paper_int").ratio, abs=1e-12)
    assert abs(vision_ratio - 0.5375) < 0.0005 and round(100 * vision_ratio, 1) == 53.7
    assert total_ratio == pytest.approx(kv_cache_bytes(cfg, n_vision, n_text, convention="complete").ratio, abs=1e-12)
    assert 0.54 < total_ratio < 0.55  # text tokens, always stored, lift the total ratio
