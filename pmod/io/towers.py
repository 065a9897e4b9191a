"""Built-in configs of the well-known vision towers, so that a released config.json alone gives a PmodConfig.

LLaVA-style configs name their tower by hub id (`mm_vision_tower: openai/clip-vit-large-patch14-336`); the
tower's own config.json is normally read from the Hugging Face cache. Counting FLOPs of a released 7B model,
or loading a checkpoint that carries the tower's weights, should not need that download, so these towers'
configs are built in. They are used only when the cache has no copy (a cached copy always wins).
Values are the towers' published config.json / preprocessor_config.json fields.
"""
from __future__ import annotations

from typing import Any

__all__ = ["BUILTIN_TOWERS", "builtin_tower"]

_CLIP_NORM = {"image_mean": (0.48145466, 0.4578275, 0.40821073), "image_std": (0.26862954, 0.26130258, 0.27577711)}
_CLIP_L14 = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
             "num_channels": 3, "patch_size": 14, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
             "attention_dropout": 0.0, "projection_dim": 768, "initializer_range": 0.02, "initializer_factor": 1.0}

BUILTIN_TOWERS: dict[str, dict[str, Any]] = {
    "openai/clip-vit-large-patch14-336": {"backend": "clip", "config": {**_CLIP_L14, "image_size": 336}, **_CLIP_NORM},
    "openai/clip-vit-large-patch14": {"backend": "clip", "config": {**_CLIP_L14, "image_size": 224}, **_CLIP_NORM},
    "google/siglip-so400m-patch14-384": {
        "backend": "siglip",
        "config": {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16,
                   "num_channels": 3, "image_size": 384, "patch_size": 14, "hidden_act": "gelu_pytorch_tanh",
                   "layer_norm_eps": 1e-6, "attention_dropout": 0.0},
        "image_mean": (0.5, 0.5, 0.5), "image_std": (0.5, 0.5, 0.5),
    },
}


def builtin_tower(name: str) -> dict[str, Any] | None:
    """The built-in description of a tower named by hub id (case as on the hub), or None."""
    return BUILTIN_TOWERS.get(name.rstrip("/"))
