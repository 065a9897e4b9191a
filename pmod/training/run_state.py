"""What a checkpoint restores besides the weights: every RNG, and the optimizer and LR schedule, with this run's
hyper-parameters kept (so that a change allowed with --allow-config-change takes effect)."""
from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from pmod.io.errors import CheckpointError

__all__ = ["restore_optimizer_and_schedule", "rng_state", "set_rng_state"]


def rng_state() -> dict[str, Any]:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def restore_optimizer_and_schedule(optimizer, scheduler, opt_state: dict, sched_state: dict) -> None:
    """Moments and step counts from the checkpoint; hyper-parameters (lr, betas, eps, weight decay, the schedule's
    shape) from this run's config, so that a change allowed with --allow-config-change really takes effect. When
    nothing changed, the values are the checkpoint's own, bit for bit."""
    fresh = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    if opt_state is not None:  # None: accelerate (DeepSpeed / FSDP) restored the optimizer in its own format
        if len(opt_state.get("param_groups", [])) != len(fresh):
            raise CheckpointError(f"the checkpoint's optimizer has {len(opt_state.get('param_groups', []))} parameter "
                                  f"group(s), this run {len(fresh)}: not the same strategy / trainable set")
        optimizer.load_state_dict(opt_state)
    for g, f in zip(optimizer.param_groups, fresh):
        g.update(f)
    scheduler.last_epoch = int(sched_state["last_epoch"])
    scheduler._step_count = int(sched_state.get("_step_count", scheduler.last_epoch + 1))
    scheduler.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
    lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for g, lr in zip(optimizer.param_groups, lrs):
        g["lr"] = lr
    scheduler._last_lr = lrs
