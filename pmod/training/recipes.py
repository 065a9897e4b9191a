"""Training recipes: the official hyper-parameters as named presets, and how a run's config is resolved.

The presets live here (not only in `train/recipes/*.yaml`) so that an installed wheel has them; the
YAML files in the repository mirror them and a test keeps the two equal. Precedence, lowest first:
TrainConfig defaults < recipe preset < `--config` YAML < explicit flags / keyword arguments.

Sources of the numbers: MCG-NJU/p-MoD `scripts/train/finetune_eval_7b_pmod_llava_{1_5,next}.sh` at
459f6df (lr 2e-5, 1 epoch, cosine, warm-up 3 %, weight decay 0, bf16, tf32, gradient checkpointing,
group_by_modality_length, 4 data workers; 1.5: 4 x 4 accumulation per GPU, 2048 tokens, `pad`; NeXT:
8 x 2, 4096 tokens, `anyres` + `spatial_unpad` with 4 sub-images), both from Vicuna-7B-v1.5, CLIP
ViT-L/14-336 and LLaVA-1.5's pre-trained projector; LLaVA-1.5's `pretrain.sh` for the projector stage
(lr 1e-3, 256 per step, `square` images, the `plain` template).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from pmod.training.config import TrainConfig

__all__ = ["RECIPES", "list_recipes", "get_recipe", "load_yaml", "resolve_config"]

PAPER_MOD = {"schedule": "shiftedcos", "max_ratio": 0.85, "min_ratio": 0.15, "avg_ratio": 0.5, "norm": "tanh",
             "norm_scale": 0.2, "norm_bias": 1.0, "router_bias": True, "router_init_std": 0.0}

_FINETUNE_COMMON: dict[str, Any] = {
    "stage": "finetune", "model": "lmsys/vicuna-7b-v1.5", "vision_tower": "openai/clip-vit-large-patch14-336",
    "projector_type": "mlp2x_gelu", "vision_select_layer": -2, "template": "vicuna_v1", "mod": PAPER_MOD,
    "num_epochs": 1, "learning_rate": 2e-5, "weight_decay": 0.0, "warmup_ratio": 0.03, "lr_scheduler": "cosine",
    "mixed_precision": "bf16", "tf32": True, "gradient_checkpointing": True, "group_by_modality_length": True,
    "num_workers": 4, "logging_steps": 1, "save_steps": 500, "save_total_limit": 1,
}

_QWEN_FINETUNE = {k: v for k, v in _FINETUNE_COMMON.items() if k not in ("vision_tower", "projector_type", "vision_select_layer")}

RECIPES: dict[str, dict[str, Any]] = {
    "pmod-llava-1.5": {**_FINETUNE_COMMON, "image_aspect_ratio": "pad", "mm_patch_merge_type": "flat",
                       "model_max_length": 2048, "per_device_batch_size": 4, "gradient_accumulation_steps": 4},
    "pmod-llava-next": {**_FINETUNE_COMMON, "image_aspect_ratio": "anyres", "mm_patch_merge_type": "spatial_unpad",
                        "max_num_sub_images": 4, "model_max_length": 4096, "per_device_batch_size": 8,
                        "gradient_accumulation_steps": 2},
    "llava-pretrain": {
        "stage": "pretrain", "model": "lmsys/vicuna-7b-v1.5", "vision_tower": "openai/clip-vit-large-patch14-336",
        "projector_type": "mlp2x_gelu", "vision_select_layer": -2, "template": "plain", "image_aspect_ratio": "square",
        "mm_patch_merge_type": "flat", "model_max_length": 2048, "num_epochs": 1, "per_device_batch_size": 32,
        "gradient_accumulation_steps": 1, "learning_rate": 1e-3, "weight_decay": 0.0, "warmup_ratio": 0.03,
        "lr_scheduler": "cosine", "mixed_precision": "bf16", "tf32": True, "gradient_checkpointing": True,
        "group_by_modality_length": False, "num_workers": 4, "logging_steps": 1, "save_steps": 500, "save_total_limit": 1,
    },
    # Ours, not the paper's (it has none for these): its fine-tuning hyper-parameters applied to converting an
    # instruction-tuned Qwen-based model (routers at zero), global batch 128 on 8 GPUs; contexts fit the largest image.
    "pmod-onevision": {**_QWEN_FINETUNE, "model": "llava-hf/llava-onevision-qwen2-7b-ov-hf", "template": "qwen",
                       "model_max_length": 8192, "per_device_batch_size": 4, "gradient_accumulation_steps": 4},
    "pmod-qwen2.5-vl": {**_QWEN_FINETUNE, "model": "Qwen/Qwen2.5-VL-7B-Instruct", "template": "qwen2_vl",
                        "model_max_length": 8192, "per_device_batch_size": 8, "gradient_accumulation_steps": 2},
    # A few dozen CPU steps on a tiny model (e.g. the synthetic VQA set): checks a setup end to end.
    "tiny-cpu": {
        "stage": "finetune", "mod": PAPER_MOD, "per_device_batch_size": 4, "gradient_accumulation_steps": 1,
        "max_steps": 40, "learning_rate": 1e-3, "warmup_ratio": 0.1, "lr_scheduler": "cosine", "weight_decay": 0.0,
        "mixed_precision": "no", "gradient_checkpointing": False, "group_by_modality_length": True, "num_workers": 0,
        "logging_steps": 5, "save_steps": 20, "save_total_limit": 2,
    },
}


def list_recipes() -> list[str]:
    return sorted(RECIPES)


def get_recipe(name: str) -> dict[str, Any]:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; expected one of {list_recipes()} or a YAML file via --config")
    return dict(RECIPES[name])


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """A recipe YAML file: a flat mapping of TrainConfig fields, optionally `recipe: NAME` to start from."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"recipe file {p} not found") from None
    except yaml.YAMLError as e:
        raise ValueError(f"recipe file {p} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):  # a user's file: reported like every other config error
        raise ValueError(f"recipe file {p} must hold a mapping of TrainConfig fields, got {type(data).__name__}")  # noqa: TRY004
    return data


def resolve_config(recipe: str | None = None, config_file: str | os.PathLike | None = None, **overrides: Any) -> TrainConfig:
    """Merge defaults < recipe < YAML < overrides (None-valued overrides are ignored: "not given")."""
    merged: dict[str, Any] = {}
    file_values = load_yaml(config_file) if config_file else {}
    name = recipe or file_values.pop("recipe", None)
    file_values.pop("recipe", None)
    if name:
        merged.update(get_recipe(name))
    merged.update(file_values)
    merged.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig.from_dict(merged)
