"""Legacy config formats -> PmodConfig. The only place that parses the official config strings.

Official p-MoD (`pmod_llava_llama`): a LlamaConfig plus LLaVA `mm_*` fields plus MoD strings
(`mod_target_layers = "shiftedcos_decay_0.85_0.15"`, `mod_weight_norm = "tanh_0.2_1"`).
"""
from __future__ import annotations

import math
import re
from typing import Any

from pmod.config import ModConfig, PmodConfig, TextConfig, VisionConfig

__all__ = ["CLIP_VISION_FIELDS", "parse_schedule", "parse_router_norm", "text_config_from_llama",
           "pmod_config_from_official", "official_ratios"]

# The CLIP fields a VisionConfig keeps from a tower's config.json (here, beside the other legacy formats).
CLIP_VISION_FIELDS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels", "image_size",
    "patch_size", "hidden_act", "layer_norm_eps", "attention_dropout", "projection_dim", "initializer_range",
    "initializer_factor",
)

_DECAY = re.compile(r"(shiftedcos|shiftedlinear)_decay_(\d+(?:\.\d+)?)_(\d+(?:\.\d+)?)")
_NORM = re.compile(r"(tanh|sigmoid|softmax|none)_(\d+(?:\.\d+)?)_(-?\d+(?:\.\d+)?)")


def parse_schedule(s: str) -> dict[str, Any]:
    """'shiftedcos_decay_0.85_0.15' -> {schedule, max_ratio, min_ratio}; also the constant kinds."""
    m = _DECAY.fullmatch(s or "")
    if m:
        return {"schedule": m.group(1), "max_ratio": float(m.group(2)), "min_ratio": float(m.group(3))}
    if s in ("deep_all", "deep_all_include_last", "interleave"):
        return {"schedule": s}
    raise ValueError(
        f"cannot parse mod_target_layers={s!r}; expected '{{shiftedcos|shiftedlinear}}_decay_{{max}}_{{min}}' "
        f"(e.g. 'shiftedcos_decay_0.85_0.15'), 'deep_all', 'deep_all_include_last' or 'interleave'"
    )


def parse_router_norm(s: str) -> dict[str, Any]:
    """'tanh_0.2_1' -> {norm, norm_scale, norm_bias}; a bare name has scale 1 and bias 1 (as official)."""
    m = _NORM.fullmatch(s or "")
    if m:
        return {"norm": m.group(1), "norm_scale": float(m.group(2)), "norm_bias": float(m.group(3))}
    if s in ("tanh", "sigmoid", "softmax", "none"):
        return {"norm": s, "norm_scale": 1.0, "norm_bias": 1.0}
    raise ValueError(f"cannot parse mod_weight_norm={s!r}; expected '{{tanh|sigmoid|softmax|none}}_{{scale}}_{{bias}}' such as 'tanh_0.2_1'")


def official_ratios(kind: str, num_layers: int, avg: float, max_r: float, min_r: float) -> dict[int, float]:
    """The official schedule exactly as its code computes it: the denominator is always 31."""
    f = {"shiftedcos": lambda i: math.cos(i * math.pi / 31) / 2 + avg, "shiftedlinear": lambda i: (-i / 31 + 0.5) + avg}[kind]
    return {i: max(f(i), min_r) for i in range(num_layers) if f(i) <= max_r}


def text_config_from_llama(c: dict[str, Any]) -> TextConfig:
    bias = bool(c.get("attention_bias", False))
    return TextConfig(
        vocab_size=c["vocab_size"],
        hidden_size=c["hidden_size"],
        intermediate_size=c["intermediate_size"],
        num_hidden_layers=c["num_hidden_layers"],
        num_attention_heads=c["num_attention_heads"],
        num_key_value_heads=c.get("num_key_value_heads"),
        head_dim=c.get("head_dim"),
        rms_norm_eps=c.get("rms_norm_eps", 1e-6),
        rope_theta=c.get("rope_theta", (c.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
        rope_scaling=c.get("rope_scaling"),
        max_position_embeddings=c.get("max_position_embeddings", 4096),
        qkv_bias=bias or c.get("model_type") == "qwen2",
        o_bias=bias,
        mlp_bias=bool(c.get("mlp_bias", False)),
        hidden_act=c.get("hidden_act", "silu"),
        tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
        bos_token_id=c.get("bos_token_id"),
        eos_token_id=c.get("eos_token_id"),
        pad_token_id=c.get("pad_token_id"),
    )


def _check_llava_fields(c: dict[str, Any]) -> None:
    if c.get("mm_use_im_start_end") or c.get("mm_use_im_patch_token"):
        raise ValueError("checkpoints with mm_use_im_start_end / mm_use_im_patch_token are not supported (LLaVA-1.5/NeXT use neither)")


def llava_image_fields(c: dict[str, Any]) -> dict[str, Any]:
    _check_llava_fields(c)
    return {
        "projector_type": c.get("mm_projector_type", "linear"),
        "image_aspect_ratio": c.get("image_aspect_ratio", "square") or "square",
        "mm_patch_merge_type": c.get("mm_patch_merge_type", "flat") or "flat",
        "image_grid_pinpoints": c.get("image_grid_pinpoints"),
        "model_max_length": c.get("tokenizer_model_max_length") or c.get("max_position_embeddings", 2048),
        "padding_side": c.get("tokenizer_padding_side", "right") or "right",
    }


def pmod_config_from_official(c: dict[str, Any], vision: VisionConfig) -> PmodConfig:
    text = text_config_from_llama(c)
    if c.get("mod_target_token_type", "vision_all") != "vision_all":
        raise ValueError(f"mod_target_token_type={c['mod_target_token_type']!r} unsupported; p-MoD routes 'vision_all'")
    sched = parse_schedule(c["mod_target_layers"])
    avg = float(c.get("mod_router_factor", 0.5))
    mod_kwargs = dict(sched, avg_ratio=avg, **parse_router_norm(c.get("mod_weight_norm", "tanh_0.2_1")),
                      router_bias=bool(c.get("mod_bias_enabled", True)))
    L = text.num_hidden_layers
    if sched["schedule"] in ("shiftedcos", "shiftedlinear"):
        official = official_ratios(sched["schedule"], L, avg, sched["max_ratio"], sched["min_ratio"])
        if L != 32:  # the official code used 31 whatever the depth: pin its exact ratios
            mod_kwargs["layer_ratios"] = official
        listed = c.get("mod_target_layer_indices")
        if listed is not None and sorted(listed) != sorted(official):
            raise ValueError(f"config lists MoD layers {listed} but its schedule gives {sorted(official)}")
    return PmodConfig(text=text, vision=vision, mod=ModConfig(**mod_kwargs), **llava_image_fields(c))


def pmod_config_from_llava(c: dict[str, Any], vision: VisionConfig) -> PmodConfig:
    """Original LLaVA-1.5 / LLaVA-NeXT (`llava_llama`, `llava_mistral`, `llava_qwen`): a dense model."""
    text = text_config_from_llama(c)
    if c.get("model_type") == "llava_qwen":
        text.qkv_bias = True
    return PmodConfig(text=text, vision=vision, mod=ModConfig(schedule="none"), **llava_image_fields(c))


def pmod_config_from_llava_hf(c: dict[str, Any], image_processor: dict[str, Any] | None = None) -> PmodConfig:
    """transformers' llava-hf layout (`llava`, `llava_next`): nested text/vision configs, dense."""
    tc, vc = dict(c["text_config"]), dict(c["vision_config"])
    if vc.get("model_type", "clip_vision_model") not in ("clip_vision_model", "clip"):
        raise ValueError(f"llava-hf vision tower {vc.get('model_type')!r} unsupported; pmod loads CLIP towers")
    layer = c.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise ValueError(f"vision_feature_layer={layer!r}: only a single layer is supported")
    strategy = c.get("vision_feature_select_strategy", "default")
    pre = image_processor or {}
    vision = VisionConfig(
        backend="clip", name=c.get("_name_or_path") or None, clip={k: vc[k] for k in CLIP_VISION_FIELDS if k in vc},
        select_layer=layer, select_feature="patch" if strategy == "default" else "cls_patch",
        **({"image_mean": tuple(pre["image_mean"]), "image_std": tuple(pre["image_std"])} if "image_mean" in pre else {}),
    )
    text = text_config_from_llama({**tc, "tie_word_embeddings": c.get("tie_word_embeddings", tc.get("tie_word_embeddings", False))})
    if c.get("projector_hidden_act", "gelu") != "gelu" or not c.get("multimodal_projector_bias", True):
        raise ValueError("llava-hf projector must be Linear-GELU-Linear with biases (LLaVA's mlp2x_gelu)")
    next_ = c.get("model_type") == "llava_next"
    return PmodConfig(
        text=text, vision=vision, mod=ModConfig(schedule="none"), projector_type="mlp2x_gelu",
        image_aspect_ratio="anyres" if next_ else ("pad" if pre.get("do_pad") else "square"),
        mm_patch_merge_type="spatial_unpad" if next_ else "flat",
        # transformers lists pinpoints as (height, width); LLaVA (and pmod) as (width, height)
        image_grid_pinpoints=[[w, h] for h, w in c["image_grid_pinpoints"]] if next_ else None,
        model_max_length=text.max_position_embeddings, padding_side="left",
    )
