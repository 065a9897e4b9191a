"""Named model shapes for `PmodConfig.from_name` (as litgpt's `Config.from_name`): the one place the released
models' shapes are written, for tests, FLOPs / KV arithmetic at 7B and the strategy comparison.

Plain data (no pmod config classes), so that `pmod.config` can read it without an import circle. The vision
towers come from `pmod.io.towers`, the tower table the checkpoint loader uses too.
"""
from __future__ import annotations

from typing import Any

from pmod.io.towers import BUILTIN_TOWERS

__all__ = ["PRESETS"]

_CLIP_336 = "openai/clip-vit-large-patch14-336"
_TOWER = BUILTIN_TOWERS[_CLIP_336]
CLIP_L14_336 = {"backend": _TOWER["backend"], "name": _CLIP_336, "clip": dict(_TOWER["config"]),
                "image_mean": _TOWER["image_mean"], "image_std": _TOWER["image_std"]}

VICUNA_7B = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
             "num_attention_heads": 32, "max_position_embeddings": 4096}
VICUNA_13B = {**VICUNA_7B, "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40, "num_attention_heads": 40}

# LLaVA-NeXT's grids of up to 4 sub-images (1x2, 2x1, 2x2, 3x1, 1x3) of 336 px, as (width, height).
NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]

PRESETS: dict[str, dict[str, Any]] = {
    "llava-1.5-7b": {"text": VICUNA_7B, "vision": CLIP_L14_336, "image_aspect_ratio": "pad", "model_max_length": 2048},
    "llava-1.5-13b": {"text": VICUNA_13B, "vision": CLIP_L14_336, "image_aspect_ratio": "pad", "model_max_length": 2048},
    "llava-next-7b": {"text": VICUNA_7B, "vision": CLIP_L14_336, "image_aspect_ratio": "anyres",
                      "mm_patch_merge_type": "spatial_unpad", "image_grid_pinpoints": NEXT_PINPOINTS,
                      "model_max_length": 4096},
    # `pmod compare-strategies`: CLIP 64-wide at 64 px / 16 px patches, a 4-layer 128-wide GQA decoder.
    "synth-compare": {"text": {"vocab_size": 128, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4,
                               "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
                               "rms_norm_eps": 1e-5},
                      "vision": {"clip": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                          "num_attention_heads": 4, "image_size": 64, "patch_size": 16,
                                          "hidden_act": "quick_gelu"}},
                      "model_max_length": 512},
}
