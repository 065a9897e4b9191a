"""Which layout a checkpoint folder holds, and its PmodConfig: `config.json` alone, no weights read.

Layouts (from `config.json`'s `model_type`): ours (`pmod`), official p-MoD (`pmod_llava_llama`), original
LLaVA-1.5 / NeXT (`llava_llama`, `llava_mistral`, `llava_qwen`) and transformers llava-hf (`llava`,
`llava_next`). Legacy fields are parsed in `pmod.io.legacy`; this module only dispatches.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pmod.config import CONFIG_NAME, MODEL_TYPE, PmodConfig, VisionConfig
from pmod.io.errors import CheckpointError, CheckpointNotFoundError
from pmod.io.files import config_path, resolve_folder
from pmod.io.keymaps import LLAVA, LLAVA_HF, OFFICIAL_PMOD, OURS, KeyMap
from pmod.io.legacy import (
    CLIP_VISION_FIELDS,
    pmod_config_from_llava,
    pmod_config_from_llava_hf,
    pmod_config_from_official,
)
from pmod.io.towers import BUILTIN_TOWERS, builtin_tower

__all__ = ["detect_layout", "clip_vision_config", "config_and_keymap", "load_config", "read_json"]


def read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"{path} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(raw).__name__}")
    return raw


def detect_layout(raw: dict[str, Any]) -> str:
    mt = raw.get("model_type")
    if mt == MODEL_TYPE:
        return "pmod"
    if mt == "pmod_llava_llama":
        return "official_pmod"
    if mt in ("llava_llama", "llava_mistral", "llava_qwen"):
        return "llava"
    if mt in ("llava", "llava_next"):
        return "llava_hf"
    if mt == "llava_onevision":
        return "onevision_hf"
    if mt in ("qwen2_5_vl", "qwen3_vl"):
        return mt
    raise CheckpointError(
        f"unknown checkpoint layout: config.json has model_type={mt!r}; pmod reads 'pmod' (ours), "
        f"'pmod_llava_llama' (official p-MoD), 'llava_llama'/'llava_mistral'/'llava_qwen' (original LLaVA), "
        f"'llava'/'llava_next' (transformers llava-hf) and 'llava_onevision' / 'qwen2_5_vl' / 'qwen3_vl' (transformers)"
    )


def clip_vision_config(tower: str, base: Path, select_layer: int = -2, select_feature: str = "patch") -> VisionConfig:
    """VisionConfig of a CLIP / SigLIP tower named by a folder (relative to the checkpoint, or absolute) or a hub
    id. A hub id that is not in the local cache falls back to pmod's built-in config of that tower, if any."""
    try:
        folder = resolve_folder(tower, base, files=[CONFIG_NAME], what="vision tower", patterns=["*.json"])
    except CheckpointNotFoundError as e:
        known = builtin_tower(tower)
        if known is None:
            raise CheckpointNotFoundError(
                f"{e}. pmod has built-in configs only for {', '.join(BUILTIN_TOWERS)}; for {tower!r} download its config "
                f"(`hf download {tower} --include '*.json'`, or the whole tower) or pass a local folder") from None
        return VisionConfig(backend=known["backend"], name=tower, clip=dict(known["config"]), select_layer=select_layer,
                            select_feature=select_feature, image_mean=known["image_mean"], image_std=known["image_std"])
    raw = read_json(folder / CONFIG_NAME)
    mt = raw.get("model_type")
    vis = raw.get("vision_config", raw) if mt in ("clip", "siglip") else raw
    backend = "siglip" if mt in ("siglip", "siglip_vision_model") else "clip"
    pre = folder / "preprocessor_config.json"
    extra = {}
    if pre.exists():
        p = read_json(pre)
        extra = {"image_mean": tuple(p.get("image_mean", VisionConfig.image_mean)), "image_std": tuple(p.get("image_std", VisionConfig.image_std))}
    return VisionConfig(
        backend=backend, name=tower, clip={k: vis[k] for k in CLIP_VISION_FIELDS if k in vis},
        select_layer=select_layer, select_feature=select_feature, **extra,
    )


def config_and_keymap(folder: Path, vision_tower: str | None = None) -> tuple[PmodConfig, KeyMap, str]:
    path = config_path(folder)
    raw = read_json(path)
    layout = detect_layout(raw)
    try:
        if layout == "pmod":
            return PmodConfig.from_dict(raw), OURS, layout
        if layout in ("llava_hf", "onevision_hf", "qwen2_5_vl", "qwen3_vl"):
            pre = folder / "preprocessor_config.json"
            pre_raw = read_json(pre) if pre.exists() else None
            if layout == "onevision_hf":
                from pmod.io.hf_vlm import ONEVISION_HF, pmod_config_from_onevision_hf

                return pmod_config_from_onevision_hf(raw, pre_raw), ONEVISION_HF, layout
            if layout in ("qwen2_5_vl", "qwen3_vl"):
                from pmod.io.hf_vlm import QWEN2_5_VL, pmod_config_from_qwen2_5_vl, pmod_config_from_qwen3_vl

                translate = pmod_config_from_qwen2_5_vl if layout == "qwen2_5_vl" else pmod_config_from_qwen3_vl
                return translate(raw, pre_raw), QWEN2_5_VL, layout
            return pmod_config_from_llava_hf(raw, pre_raw), LLAVA_HF, layout
        if "mm_vision_tower" not in raw:
            raise CheckpointError(f"{path}: a {raw.get('model_type')} config needs mm_vision_tower")
        vision = clip_vision_config(
            vision_tower or raw["mm_vision_tower"], folder, raw.get("mm_vision_select_layer", -2), raw.get("mm_vision_select_feature", "patch")
        )
        if layout == "llava":
            return pmod_config_from_llava(raw, vision), LLAVA, layout
        return pmod_config_from_official(raw, vision), OFFICIAL_PMOD, layout
    except CheckpointError:
        raise
    except KeyError as e:
        raise CheckpointError(f"{path}: required field {e} is missing") from None
    except (ValueError, TypeError, AttributeError) as e:  # the config's own validation, naming the field
        raise CheckpointError(f"{path}: {e}") from None


def load_config(path: str | os.PathLike, vision_tower: str | None = None) -> PmodConfig:
    """The model config of a checkpoint folder or hub id, without reading any weights."""
    folder = resolve_folder(str(path), None, files=[CONFIG_NAME], what="checkpoint", patterns=["*.json"])
    return config_and_keymap(folder, vision_tower)[0]
