"""Training LLaVA-style p-MoD models: projector pre-training and instruction fine-tuning on accelerate.

    from pmod.training import resolve_config, train
    cfg = resolve_config("pmod-llava-1.5", model="lmsys/vicuna-7b-v1.5", data="mix665k.json",
                         image_folder="data", output="runs/a", pretrain_mm_projector="mm_projector.bin")
    train(cfg)                       # under `accelerate launch` for several GPUs / nodes

The same as `pmod train --recipe pmod-llava-1.5 --model ... --data ... --image-folder ... --output ...`.
"""
from __future__ import annotations

from pmod.training.config import TrainConfig
from pmod.training.recipes import RECIPES, get_recipe, list_recipes, resolve_config
from pmod.peft.strategy import (  # the strategy protocol is pmod.peft's; re-exported for training scripts
    BaseStrategy,
    FullStrategy,
    Strategy,
    get_strategy,
    list_strategies,
    register_strategy,
)

__all__ = ["TrainConfig", "RECIPES", "get_recipe", "list_recipes", "resolve_config", "train", "TrainResult",
           "Strategy", "BaseStrategy", "FullStrategy", "get_strategy", "list_strategies", "register_strategy"]


def __getattr__(name: str):
    # the loop pulls in accelerate and the model; keep `import pmod.training` light for the CLI's --help
    if name in ("train", "TrainResult"):
        from pmod.training import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'pmod.training' has no attribute {name!r}")
