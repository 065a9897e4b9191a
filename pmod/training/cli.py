"""`pmod train`: flags generated from `TrainConfig`, so the CLI, the YAML recipes and Python stay in step.

Every flag defaults to "not given" so that precedence works: TrainConfig defaults < `--recipe` <
`--config FILE.yaml` < flags. `--print-config` shows the resolved run and exits.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

import yaml

from pmod.training.config import LR_SCHEDULERS, MIXED_PRECISION, STAGES, TrainConfig
from pmod.training.recipes import list_recipes, resolve_config

__all__ = ["add_parser", "add_arguments", "run", "config_from_args"]

_TYPES: dict[str, Any] = {  # fields whose default (None) does not tell the type
    "image_folder": str, "vision_tower": str, "tokenizer": str, "pretrain_mm_projector": str, "image_aspect_ratio": str,
    "mm_patch_merge_type": str, "template": str, "model_max_length": int, "max_samples": int, "max_steps": int,
    "projector_lr": float, "vision_tower_lr": float, "router_lr": float, "warmup_steps": int, "save_total_limit": int, "run_name": str,
}
_CHOICES = {"stage": STAGES, "mixed_precision": MIXED_PRECISION, "lr_scheduler": LR_SCHEDULERS,
            "image_aspect_ratio": ("pad", "anyres", "square"), "mm_patch_merge_type": ("flat", "spatial_unpad", "spatial"),
            "max_num_sub_images": (4, 9)}
_HELP = {
    "model": "dense LLM folder (llama/qwen2/mistral; needs --vision-tower) or a LLaVA / p-MoD / pmod checkpoint",
    "data": "LLaVA conversation JSON (list) or JSON lines", "image_folder": "folder the records' image paths are relative to",
    "output": "run folder: checkpoints/, train_log.jsonl, the trained model",
    "stage": "pretrain: projector only; finetune: LLM + projector + routers",
    "strategy": "fine-tuning strategy (pmod.training.list_strategies())", "max_steps": "optimizer steps (overrides --num-epochs)",
    "pretrain_mm_projector": "mm_projector.bin / .safetensors (or a folder with one) to start the projector from",
    "template": "conversation template (default: plain for pretrain, the checkpoint's for finetune)",
    "model_max_length": "merged tokens per sample (text + image features); longer samples are truncated",
    "mixed_precision": "no, bf16 or fp16 (autocast by accelerate; DeepSpeed uses its config)",
    "report_to": "comma-separated trackers: tensorboard, wandb", "save_steps": "write a checkpoint every N optimizer steps",
    "allow_config_change": "let --resume apply settings that differ from the run's saved ones (learning rates, "
                           "schedule, logging, checkpointing, moved paths)",
    "allow_outside_image_folder": "let records name images outside --image-folder (../x.png, absolute paths)",
}
_MOD_FLAGS = {"mod_schedule": ("schedule", str), "mod_avg_ratio": ("avg_ratio", float), "mod_max_ratio": ("max_ratio", float),
              "mod_min_ratio": ("min_ratio", float)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", choices=list_recipes(), help="start from a preset of the official hyper-parameters")
    p.add_argument("--config", help="recipe YAML file (TrainConfig fields; may name a `recipe:` to extend)")
    p.add_argument("--print-config", action="store_true", help="print the resolved run config as YAML and exit")
    p.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue from the last complete checkpoint in --output (or from the folder given); with "
                        "--output alone, the run's saved train_config.yaml gives every other setting")
    p.add_argument("--strategy-option", action="append", default=[], metavar="KEY=VALUE", help="option of the strategy (YAML value)")
    p.add_argument("--mod-schedule", help="p-MoD schedule (shiftedcos, shiftedlinear, ...); 'none' trains the dense baseline")
    for flag in ("mod_avg_ratio", "mod_max_ratio", "mod_min_ratio"):
        p.add_argument("--" + flag.replace("_", "-"), type=float)
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("resume", "mod", "strategy_options"):
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        kw: dict[str, Any] = {"default": None, "help": _HELP.get(f.name)}
        if isinstance(default, bool):
            kw["action"] = argparse.BooleanOptionalAction
        elif f.name == "report_to":
            kw["type"] = str
        else:
            kw["type"] = _TYPES.get(f.name, type(default) if default is not None else str)
            if f.name in _CHOICES:
                kw["choices"] = _CHOICES[f.name]
        p.add_argument(flag, **kw)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("train", help="train a LLaVA-style p-MoD model (projector pre-training or fine-tuning)",
                              description="Train on accelerate; run under `accelerate launch` for several processes.")
    add_arguments(p)
    p.set_defaults(fn=run)
    return p


def _saved_run_config(args: argparse.Namespace) -> TrainConfig | None:
    """`--resume` with `--output DIR` and neither --recipe nor --config: the run's own saved train_config.yaml."""
    if args.resume is None or not getattr(args, "output", None) or args.recipe or args.config:
        return None
    path = Path(args.output) / "train_config.yaml"
    if not path.is_file():
        return None
    try:
        raw = yaml.safe_load(path.read_text())
        return TrainConfig.from_dict(raw)
    except (yaml.YAMLError, ValueError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: cannot read the run's saved config ({type(e).__name__}: {e}); pass the run's "
                         f"arguments again (or --config FILE)") from None


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig)} - {"mod", "strategy_options"}
    overrides = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    saved = _saved_run_config(args)
    cfg = saved.replace(**overrides) if saved is not None else resolve_config(args.recipe, args.config, **overrides)
    mod_given = {key: getattr(args, flag) for flag, (key, _) in _MOD_FLAGS.items() if getattr(args, flag, None) is not None}
    if mod_given:
        mod = {"schedule": "none"} if mod_given.get("schedule") == "none" else {**(cfg.mod or {}), **mod_given}
        cfg = cfg.replace(mod=mod)
    if args.strategy_option:
        opts = dict(cfg.strategy_options)
        for item in args.strategy_option:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise ValueError(f"--strategy-option {item!r}: expected KEY=VALUE")
            opts[key] = yaml.safe_load(value)
        cfg = cfg.replace(strategy_options=opts)
    return cfg


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if args.print_config:
        sys.stdout.write(yaml.safe_dump(cfg.to_dict(), sort_keys=True))
        return 0
    from pmod.training.loop import train

    res = train(cfg)
    print(f"pmod train: {res.steps} steps, last loss {res.loss if res.loss is None else round(res.loss, 4)}; model: {res.exported}")
    return 0
