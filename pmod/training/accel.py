"""The accelerator of a run, and the DeepSpeed values accelerate cannot infer for a non-transformers model.

Which backend runs (one CPU process, DDP, FSDP, DeepSpeed ZeRO-2/3, several nodes) is decided by
`accelerate launch` and its config file (train/accelerate/*.yaml); this module only adds what the run
config owns: mixed precision, gradient accumulation, trackers, and DDP's `find_unused_parameters`
(text-only batches leave the projector and the routers without gradient).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from pmod.training.config import TrainConfig

__all__ = ["make_accelerator", "fill_deepspeed_auto", "zero_stage"]


def make_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, is_tensorboard_available, is_wandb_available

    available = {"tensorboard": is_tensorboard_available(), "wandb": is_wandb_available()}
    missing = [t for t in cfg.report_to if not available.get(t, False)]
    if missing:
        raise ValueError(f"report_to={cfg.report_to} but {missing} is not installed (pip install {' '.join(missing)})")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    _allow_new_precision(cfg.mixed_precision, world)
    acc = Accelerator(
        mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        log_with=cfg.report_to or None, project_dir=str(Path(cfg.output) / "logs"),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=cfg.ddp_find_unused_parameters)],
        cpu=world > 1 and not _has_accelerator_device(),  # else accelerate leaves CPU processes unconnected
    )
    if world > 1 and acc.num_processes != world:
        raise RuntimeError(f"{world} processes were launched but accelerate set up {acc.num_processes}: each would train "
                           f"alone and overwrite the same output; check the accelerate config")
    return acc


def _allow_new_precision(mixed_precision: str, world: int) -> None:
    """accelerate keeps one process-wide state and refuses a second Accelerator with another precision;
    a single-process Python session (a notebook, the tests) may run several trainings, so we reset it
    there. Launched multi-process runs build one Accelerator per process and are left alone."""
    from accelerate.state import AcceleratorState

    current = AcceleratorState._shared_state.get("_mixed_precision")
    if world <= 1 and current is not None and str(getattr(current, "value", current)) != mixed_precision:
        AcceleratorState._reset_state()


def _has_accelerator_device() -> bool:
    probe = getattr(torch, "accelerator", None)
    return bool(probe.is_available()) if probe is not None else torch.cuda.is_available()


def zero_stage(accelerator) -> int | None:
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return None if plugin is None else int(plugin.zero_stage)


def fill_deepspeed_auto(accelerator, cfg: TrainConfig, hidden_size: int) -> None:
    """accelerate fills DeepSpeed's "auto" values from a DataLoader it prepares and from a transformers
    `model.config.hidden_size`; we prepare neither, so we fill them (transformers' rules) here."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    ds = plugin.deepspeed_config
    zero = ds.setdefault("zero_optimization", {})
    values = {
        ("train_micro_batch_size_per_gpu",): cfg.per_device_batch_size,
        ("gradient_clipping",): cfg.max_grad_norm,
        ("zero_optimization", "reduce_bucket_size"): hidden_size * hidden_size,
        ("zero_optimization", "stage3_prefetch_bucket_size"): int(0.9 * hidden_size * hidden_size),
        ("zero_optimization", "stage3_param_persistence_threshold"): 10 * hidden_size,
    }
    for path, value in values.items():
        node = ds if len(path) == 1 else zero
        absent = "auto" if len(path) == 1 else None  # zero_optimization keys: only those asked for as "auto"
        if node.get(path[-1], absent) == "auto":
            node[path[-1]] = value
