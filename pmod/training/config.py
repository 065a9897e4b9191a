"""The run arguments of `pmod train`, one validated dataclass (separate from the model's `PmodConfig`).

Why a dataclass and not argparse alone: the same object is built from a recipe preset, a YAML file,
CLI flags or Python keyword arguments, is saved next to every checkpoint (so `--resume` can check it
is continuing the same run), and fails at construction with a message naming the bad value.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from pmod.config_checks import from_fields

__all__ = ["TrainConfig", "STAGES", "MIXED_PRECISION", "LR_SCHEDULERS", "RESUMABLE_FIELDS", "check_resume_config"]

STAGES = ("pretrain", "finetune")
MIXED_PRECISION = ("no", "bf16", "fp16")
LR_SCHEDULERS = ("cosine", "linear", "constant")
TRACKERS = ("tensorboard", "wandb")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(f"TrainConfig: {msg}")


@dataclass
class TrainConfig:
    """Everything a training run needs. `None` means "take it from the checkpoint or the stage":
    `template` is `plain` for pre-training and the checkpoint's (vicuna_v1) for fine-tuning; `mod`
    converts a dense model to the paper's p-MoD schedule when fine-tuning (`{"schedule": "none"}`
    trains the dense baseline) and leaves the model as it is when pre-training."""

    # --- what to train, where to write ------------------------------------------------------------
    model: str = ""  # LLaVA / p-MoD / pmod checkpoint, or a dense LLM folder (llama, qwen2, mistral)
    data: str = ""  # LLaVA conversation JSON (a list) or JSON lines
    output: str = ""
    image_folder: str | None = None
    stage: str = "finetune"
    strategy: str = "full"
    strategy_options: dict[str, Any] = field(default_factory=dict)

    # --- model construction -------------------------------------------------------------------------
    vision_tower: str | None = None  # CLIP folder or hub id; needed when `model` is a plain LLM
    tokenizer: str | None = None  # default: the model's folder
    pretrain_mm_projector: str | None = None  # mm_projector.bin / .safetensors, or a folder holding one
    mod: dict[str, Any] | None = None  # ModConfig fields
    projector_type: str = "mlp2x_gelu"  # for a model built from LLM + CLIP
    image_aspect_ratio: str | None = None  # pad | anyres | square; None = the checkpoint's ("pad" for LLM + CLIP)
    mm_patch_merge_type: str | None = None  # flat | spatial_unpad
    max_num_sub_images: int = 4  # anyres grids: 4 -> [1,2] [2,1] [2,2] [3,1] [1,3] (the p-MoD NeXT setting)
    vision_select_layer: int = -2
    train_vision_tower: bool = False
    attn_backend: str = "auto"

    # --- data ---------------------------------------------------------------------------------------
    template: str | None = None
    model_max_length: int | None = None  # merged tokens (text + image features); None = the checkpoint's
    group_by_modality_length: bool = True
    check_images: bool = True  # stat every image file up front, so missing ones are reported before step 0
    allow_outside_image_folder: bool = False  # image paths (`../x.png`, absolute) may leave --image-folder
    num_workers: int = 0
    max_samples: int | None = None

    # --- optimisation -------------------------------------------------------------------------------
    num_epochs: int = 1
    max_steps: int | None = None  # optimizer steps; overrides num_epochs
    per_device_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2e-5
    projector_lr: float | None = None  # LLaVA's mm_projector_lr
    vision_tower_lr: float | None = None  # LLaVA's mm_vision_tower_lr (with train_vision_tower)
    router_lr: float | None = None  # MoD routers; None = learning_rate
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    warmup_steps: int | None = None  # overrides warmup_ratio
    max_grad_norm: float = 1.0  # 0 disables clipping
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    tf32: bool = True
    seed: int = 42

    # --- checkpoints and logs -----------------------------------------------------------------------
    save_steps: int = 500
    save_total_limit: int | None = 2
    resume: str | None = None  # "latest" or a checkpoint folder
    logging_steps: int = 1
    report_to: list[str] = field(default_factory=list)
    run_name: str | None = None
    ddp_find_unused_parameters: bool = True  # text-only batches leave the projector and routers unused
    allow_config_change: bool = False  # --resume with settings that differ from the run's saved ones (RESUMABLE_FIELDS)

    def __post_init__(self) -> None:
        _check(self.stage in STAGES, f"stage={self.stage!r}; expected one of {STAGES}")
        _check(self.mixed_precision in MIXED_PRECISION, f"mixed_precision={self.mixed_precision!r}; expected one of {MIXED_PRECISION}")
        _check(self.lr_scheduler in LR_SCHEDULERS, f"lr_scheduler={self.lr_scheduler!r}; expected one of {LR_SCHEDULERS}")
        for name in ("per_device_batch_size", "gradient_accumulation_steps", "num_epochs", "logging_steps", "save_steps"):
            _check(int(getattr(self, name)) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        _check(self.max_steps is None or self.max_steps >= 1, f"max_steps must be >= 1, got {self.max_steps}")
        _check(self.learning_rate > 0, f"learning_rate must be positive, got {self.learning_rate}")
        _check(0.0 <= self.warmup_ratio < 1.0, f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        _check(self.max_grad_norm >= 0, f"max_grad_norm must be >= 0 (0 disables clipping), got {self.max_grad_norm}")
        _check(self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers}")
        _check(self.save_total_limit is None or self.save_total_limit >= 1,
               f"save_total_limit must be >= 1 or None, got {self.save_total_limit}")
        _check(self.image_aspect_ratio in (None, "pad", "anyres", "square"),
               f"image_aspect_ratio={self.image_aspect_ratio!r}; expected pad, anyres or square")
        _check(self.max_num_sub_images in (4, 9), f"max_num_sub_images={self.max_num_sub_images}; the anyres grids exist for 4 and 9")
        if isinstance(self.report_to, str):
            self.report_to = [] if self.report_to in ("", "none") else [s.strip() for s in self.report_to.split(",")]
        bad = [t for t in self.report_to if t not in TRACKERS]
        _check(not bad, f"report_to names unknown tracker(s) {bad}; expected {TRACKERS}")
        if self.mod is not None:
            from pmod.config import ModConfig

            ModConfig(**self.mod)  # validate now, not after the model is loaded

    def check_required(self) -> None:
        """The fields no recipe can fill: raised before anything heavy is loaded."""
        missing = [f"--{n.replace('_', '-')}" for n in ("model", "data", "output") if not getattr(self, n)]
        if missing:
            raise ValueError(f"pmod train needs {', '.join(missing)} (as flags, in --config YAML or in the recipe)")

    @property
    def grids(self) -> list[list[int]]:
        """The anyres grids (columns x rows of sub-images) of the official p-MoD NeXT recipe."""
        if self.max_num_sub_images == 4:
            return [[1, 2], [2, 1], [2, 2], [3, 1], [1, 3]]
        return [[1, 2], [2, 1], [2, 2], [3, 1], [1, 3], [3, 2], [2, 3], [3, 3], [2, 4], [4, 2]]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        return from_fields(cls, d, "TrainConfig")

    def replace(self, **changes: Any) -> TrainConfig:
        return TrainConfig.from_dict({**self.to_dict(), **changes})


# What a resumed run may change (with --allow-config-change): optimiser hyper-parameters and the schedule's shape
# (applied from the next step on: the checkpoint keeps the moments, the run's config gives the values), logging
# and checkpointing, and paths that moved. Everything else fixes the model, the data order or the numerics.
RESUMABLE_FIELDS = frozenset({
    "learning_rate", "projector_lr", "vision_tower_lr", "router_lr", "weight_decay", "adam_beta1", "adam_beta2",
    "adam_epsilon", "lr_scheduler", "warmup_ratio", "warmup_steps", "max_grad_norm", "save_steps", "save_total_limit",
    "logging_steps", "report_to", "run_name", "num_workers", "check_images", "gradient_checkpointing", "tf32",
    "attn_backend", "ddp_find_unused_parameters", "model", "data", "image_folder", "vision_tower", "tokenizer",
    "pretrain_mm_projector",
})
_NOT_COMPARED = frozenset({"resume", "output", "allow_config_change"})


def check_resume_config(saved: TrainConfig, given: TrainConfig, where: str) -> list[str]:
    """The fields `given` changes against the run's saved config (as 'field: saved X, given Y'); raises unless every
    change is allowed (`given.allow_config_change` and the field in RESUMABLE_FIELDS), naming each changed field."""
    a, b = saved.to_dict(), given.to_dict()
    changed = sorted(k for k in a if k not in _NOT_COMPARED and a[k] != b.get(k))
    if not changed:
        return []
    shown = [f"{k}: saved {a[k]!r}, given {b.get(k)!r}" for k in changed]
    fixed = [k for k in changed if k not in RESUMABLE_FIELDS]
    if fixed:
        raise ValueError(f"cannot resume {where}: the given settings differ from the run's saved train_config.yaml ("
                         f"{'; '.join(shown)}). {', '.join(fixed)} cannot change on resume (they fix the model, the data "
                         f"order or the numerics); resume with the saved settings (`pmod train --output DIR --resume` "
                         f"reads them) or start a new --output")
    if not given.allow_config_change:
        raise ValueError(f"cannot resume {where}: the given settings differ from the run's saved train_config.yaml ("
                         f"{'; '.join(shown)}). Pass --allow-config-change to apply them from the next step on, or "
                         f"resume with the saved settings (`pmod train --output DIR --resume` reads them)")
    return shown
