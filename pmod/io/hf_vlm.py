"""transformers' Qwen-based vision-language layouts -> PmodConfig + key maps.

- `llava_onevision` (LLaVA-OneVision: SigLIP tower, Qwen2 decoder, anyres_max_N tiling): the llava-hf key names,
  both the pre-4.52 spelling (`language_model.model.*`, `vision_tower.vision_model.*`) and transformers 5's.
- `qwen2_5_vl` (Qwen2.5-VL: its own ViT with window attention and patch merger, Qwen2 decoder with M-RoPE): the
  hub names (`visual.*`, `model.layers.*`) and transformers 5's (`model.visual.*`, `model.language_model.*`).
- `qwen3_vl` (Qwen3-VL: Qwen3 decoder with q/k norm and interleaved M-RoPE, a ViT with DeepStack mergers): the same
  key map.
Field names follow transformers' configs; what pmod cannot reproduce exactly is refused with the field named.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from pmod.config import ModConfig, PmodConfig, VisionConfig
from pmod.io.keymaps import LLAVA_HF, KeyMap
from pmod.io.legacy import text_config_from_llama

__all__ = ["ONEVISION_HF", "QWEN2_5_VL", "SIGLIP_FIELDS", "pmod_config_from_onevision_hf", "pmod_config_from_qwen2_5_vl",
           "pmod_config_from_qwen3_vl"]

SIGLIP_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
                 "image_size", "patch_size", "hidden_act", "layer_norm_eps", "attention_dropout")
SIGLIP_NORM = (0.5, 0.5, 0.5)  # siglip-so400m's preprocessor_config.json (the OneVision processors use it too)

# The same names as llava-hf (projector linear_1 / linear_2, image_newline, vision_tower.*, language_model.*).
ONEVISION_HF = KeyMap("llava-onevision", [(p.pattern, r) for p, r in LLAVA_HF.rules], [(p.pattern, r) for p, r in LLAVA_HF.inverse])


_DEC = r"(layers\.\d+\..+|embed_tokens\.weight|norm\.weight)"
QWEN2_5_VL = KeyMap(
    "Qwen2.5-VL",
    [
        (r"(?:model\.)?visual\.(.+)", r"vision_tower.model.\1"),
        (rf"model\.(?:language_model\.)?{_DEC}", r"language_model.\1"),
        (r"lm_head\.weight", "lm_head.weight"),
    ],
    [
        (r"vision_tower\.model\.(.+)", [r"visual.\1", r"model.visual.\1"]),
        (rf"language_model\.{_DEC}", [r"model.\1", r"model.language_model.\1"]),
        (r"lm_head\.weight", [r"lm_head.weight"]),
    ],
)
QWEN_VISION_FIELDS = ("depth", "hidden_size", "intermediate_size", "num_heads", "in_channels", "patch_size",
                      "spatial_merge_size", "temporal_patch_size", "window_size", "fullatt_block_indexes", "out_hidden_size",
                      "hidden_act", "tokens_per_second", "rope_parameters")
QWEN3_VISION_FIELDS = ("depth", "hidden_size", "intermediate_size", "num_heads", "in_channels", "patch_size",
                       "spatial_merge_size", "temporal_patch_size", "out_hidden_size", "hidden_act", "num_position_embeddings",
                       "deepstack_visual_indexes", "rope_parameters")
CLIP_NORM = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))  # Qwen2-VL's processor


def _image_norm(pre: dict[str, Any] | None) -> dict[str, tuple[float, ...]]:
    pre = pre or {}
    return {"image_mean": tuple(pre.get("image_mean", SIGLIP_NORM)), "image_std": tuple(pre.get("image_std", SIGLIP_NORM))}


def pmod_config_from_onevision_hf(c: dict[str, Any], image_processor: dict[str, Any] | None = None) -> PmodConfig:
    """A dense PmodConfig from transformers' `llava_onevision` config.json (+ preprocessor_config.json if present)."""
    from pmod.multimodal.onevision import parse_anyres_max

    tc, vc = dict(c["text_config"]), dict(c.get("vision_config") or {})
    if tc.get("model_type", "qwen2") != "qwen2":
        raise ValueError(f"llava_onevision text_config.model_type={tc.get('model_type')!r} unsupported; pmod loads Qwen2 decoders")
    if tc.get("use_sliding_window"):
        raise ValueError("llava_onevision text_config.use_sliding_window=true is unsupported (pmod attends to the full context)")
    mt = vc.get("model_type", "siglip_vision_model")
    if mt not in ("siglip_vision_model", "siglip"):
        raise ValueError(f"llava_onevision vision_config.model_type={mt!r} unsupported; pmod loads SigLIP towers")
    layer = c.get("vision_feature_layer", -1)
    if not isinstance(layer, int):
        raise ValueError(f"vision_feature_layer={layer!r}: only a single layer is supported")
    if c.get("vision_feature_select_strategy", "full") != "full":
        raise ValueError(f"vision_feature_select_strategy={c.get('vision_feature_select_strategy')!r}: a SigLIP tower has no "
                         f"CLS token to drop; OneVision uses 'full'")
    if c.get("projector_hidden_act", "gelu") != "gelu" or not c.get("multimodal_projector_bias", True):
        raise ValueError("llava_onevision projector must be Linear-GELU-Linear with biases")
    # transformers' SiglipVisionConfig defaults, written out: the tower is rebuilt from this dict alone
    siglip = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
              "num_channels": 3, "image_size": 224, "patch_size": 16, "hidden_act": "gelu_pytorch_tanh",
              "layer_norm_eps": 1e-6, "attention_dropout": 0.0}
    siglip.update({k: vc[k] for k in SIGLIP_FIELDS if k in vc})
    siglip["vision_use_head"] = False  # OneVision checkpoints carry no pooling head
    vision = VisionConfig(backend="siglip", name=c.get("_name_or_path") or None, clip=siglip, select_layer=layer,
                          select_feature="patch", **_image_norm(image_processor))
    tie = bool(c.get("tie_word_embeddings", False) or tc.get("tie_word_embeddings", False))
    text = text_config_from_llama({**tc, "model_type": "qwen2", "tie_word_embeddings": tie})
    pins = c.get("image_grid_pinpoints") or (image_processor or {}).get("image_grid_pinpoints")
    if not pins:
        raise ValueError("llava_onevision config has no image_grid_pinpoints")
    return PmodConfig(
        text=text, vision=vision, mod=ModConfig(schedule="none"), projector_type="mlp2x_gelu",
        image_aspect_ratio="anyres", mm_patch_merge_type="spatial_unpad",
        # transformers lists pinpoints as (height, width); pmod as (width, height)
        image_grid_pinpoints=[[int(w), int(h)] for h, w in pins],
        anyres_max_crops=parse_anyres_max(c.get("vision_aspect_ratio", "anyres_max_9")),
        model_max_length=text.max_position_embeddings, padding_side="left", conv_template="qwen",
    )


def pmod_config_from_qwen2_5_vl(c: dict[str, Any], image_processor: dict[str, Any] | None = None) -> PmodConfig:
    """A dense PmodConfig from transformers' `qwen2_5_vl` config.json: the hub's flat text fields (transformers 4.x,
    `rope_scaling: {type: mrope, mrope_section}`) or transformers 5's nested `text_config` (`rope_parameters`)."""
    return _qwen_vl_config(c, image_processor, "qwen2_5_vl")


def pmod_config_from_qwen3_vl(c: dict[str, Any], image_processor: dict[str, Any] | None = None) -> PmodConfig:
    """A dense PmodConfig from transformers' `qwen3_vl` config.json: Qwen3 decoder (q/k norm, no QKV bias), interleaved
    M-RoPE, a ViT with DeepStack mergers (patch 16)."""
    return _qwen_vl_config(c, image_processor, "qwen3_vl")


def _qwen_vl_config(c: dict[str, Any], pre: dict[str, Any] | None, kind: str) -> PmodConfig:
    qwen3 = kind == "qwen3_vl"
    tc = dict(c.get("text_config") or {k: v for k, v in c.items() if k != "vision_config"})
    if tc.get("use_sliding_window"):
        raise ValueError(f"{kind} use_sliding_window=true is unsupported (pmod attends to the full context)")
    rope = {**(tc.get("rope_scaling") or {}), **(tc.get("rope_parameters") or {})}
    section = rope.get("mrope_section")
    if section is None:
        raise ValueError(f"{kind} config has no mrope_section (rope_parameters or rope_scaling)")
    rtype = rope.get("rope_type", rope.get("type", "default"))
    if rtype not in ("default", "mrope"):
        raise ValueError(f"{kind} rope type {rtype!r} unsupported; pmod implements the default M-RoPE")
    if bool(rope.get("mrope_interleaved", False)) != qwen3:
        raise ValueError(f"{kind}: mrope_interleaved={rope.get('mrope_interleaved')!r} is not what {kind} uses")
    theta = rope.get("rope_theta", tc.get("rope_theta", 1000000.0))
    tie = bool(c.get("tie_word_embeddings", tc.get("tie_word_embeddings", False)))
    text = text_config_from_llama({**{k: v for k, v in tc.items() if k not in ("rope_scaling", "rope_parameters")},
                                   "model_type": "qwen3" if qwen3 else "qwen2", "rope_theta": theta, "tie_word_embeddings": tie})
    text = dataclasses.replace(text, mrope_section=[int(v) for v in section], mrope_interleaved=qwen3, qk_norm=qwen3)
    vc = dict(c.get("vision_config") or {})
    if "in_chans" in vc and "in_channels" not in vc:  # the hub's older spelling
        vc["in_channels"] = vc["in_chans"]
    tower = {k: vc[k] for k in (QWEN3_VISION_FIELDS if qwen3 else QWEN_VISION_FIELDS) if k in vc}
    tower.setdefault("out_hidden_size", text.hidden_size)
    if tower["out_hidden_size"] != text.hidden_size:
        raise ValueError(f"{kind} vision_config.out_hidden_size={tower['out_hidden_size']} differs from the decoder's "
                         f"hidden_size={text.hidden_size}")
    pre = pre or {}
    size = pre.get("size") or {}
    mean, std = (SIGLIP_NORM, SIGLIP_NORM) if qwen3 else CLIP_NORM  # Qwen3-VL's processor normalises with 0.5
    factor = tower.get("patch_size", 16 if qwen3 else 14) * tower.get("spatial_merge_size", 2)
    vision = VisionConfig(backend=kind, name=c.get("_name_or_path") or None, clip=tower, select_layer=-1,
                          image_mean=tuple(pre.get("image_mean", mean)), image_std=tuple(pre.get("image_std", std)),
                          min_pixels=int(pre.get("min_pixels", size.get("shortest_edge", 4 * factor * factor))),
                          max_pixels=int(pre.get("max_pixels", size.get("longest_edge", 1280 * factor * factor))))
    return PmodConfig(text=text, vision=vision, mod=ModConfig(schedule="none"), projector_type="none",
                      image_aspect_ratio="native", model_max_length=text.max_position_embeddings, padding_side="left",
                      conv_template="qwen3_vl" if qwen3 else "qwen2_vl")
