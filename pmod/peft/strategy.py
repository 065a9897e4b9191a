"""The protocol of fine-tuning strategies, owned by pmod.peft and driven by pmod.training: what trains, how the
optimizer is built, hooks around each step.

A strategy is a small object behind a registry (`get_strategy("full")`), never a forked model class.
The training loop calls, in order:

    strategy.check_distributed(distributed_type, zero_stage)   # refuse unsupported set-ups early
    model = strategy.prepare(model, roles)     # freeze / add adapters / masks; `roles` = what the stage trains
    opt = strategy.build_optimizer(model, cfg)
    per optimizer step:
        strategy.on_step_begin(step, model, opt)        # e.g. LISA switches its active layers
        per micro-batch: with strategy.forward_context(model): forward; backward
        strategy.after_backward(model)                  # e.g. cache gradient norms, mask gradients
        optimizer step (clipped), scheduler step, zero_grad(set_to_none=True)
        strategy.after_optimizer_step(step, model, opt) # e.g. restore perturbed weights
    strategy.state_dict() / load_state_dict()           # saved in every checkpoint, restored by --resume
    strategy.export(model, state, folder) -> state      # the plain checkpoint to write (merge adapters here)

`model` is always the unwrapped `PmodForConditionalGeneration`; parameter roles: `pmod.peft.roles`. A new strategy
is one file: a class with `@register_strategy("name")`, imported by `pmod/peft/__init__.py`.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from pmod.peft.roles import param_role, set_trainable

__all__ = ["Strategy", "BaseStrategy", "FullStrategy", "register_strategy", "get_strategy", "list_strategies"]


@runtime_checkable
class Strategy(Protocol):
    name: str

    def check_distributed(self, distributed_type: str, zero_stage: int | None) -> None: ...
    def prepare(self, model: nn.Module, roles: set[str]) -> nn.Module: ...
    def build_optimizer(self, model: nn.Module, cfg: Any) -> torch.optim.Optimizer: ...
    def on_step_begin(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None: ...
    def forward_context(self, model: nn.Module) -> contextlib.AbstractContextManager: ...
    def after_backward(self, model: nn.Module) -> None: ...
    def after_optimizer_step(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...
    def export(self, model: nn.Module, state: dict[str, torch.Tensor], folder: Path) -> dict[str, torch.Tensor]: ...


class BaseStrategy:
    """Defaults for every hook: train the stage's roles with AdamW; subclasses override what differs."""

    name = "base"

    def __init__(self, **options: Any):
        if options:
            raise ValueError(f"strategy {self.name!r} takes no options, got {sorted(options)}")

    def check_distributed(self, distributed_type: str, zero_stage: int | None) -> None:
        return None

    def prepare(self, model: nn.Module, roles: set[str]) -> nn.Module:
        set_trainable(model, roles)
        return model

    def param_groups(self, model: nn.Module, cfg: Any, own: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """AdamW groups: no weight decay on 1-D tensors (biases, norms, image_newline), as transformers'
        Trainer; the projector, vision tower and routers at their own rate when set (LLaVA's
        mm_projector_lr and mm_vision_tower_lr; `router_lr` keeps Adam from saturating TanhNorm at
        the high rates of small from-scratch models). `own`: a group with hyper-parameters of its own (a
        strategy's projected or masked weights), placed first; its parameters leave the role groups."""
        role_lr = {"projector": cfg.projector_lr, "vision": getattr(cfg, "vision_tower_lr", None),
                   "router": getattr(cfg, "router_lr", None)}
        groups: dict[tuple[bool, str], list[nn.Parameter]] = {}
        for name, p in model.named_parameters():
            if p.requires_grad:
                role = param_role(name)
                key = (p.ndim >= 2, role if role_lr.get(role) is not None else "")
                groups.setdefault(key, []).append(p)
        out = []
        for (decay, role), params in sorted(groups.items()):
            g: dict[str, Any] = {"params": params, "weight_decay": cfg.weight_decay if decay else 0.0}
            if role:
                g["lr"] = role_lr[role]
            out.append(g)
        if not out:
            raise ValueError(f"strategy {self.name!r}: no trainable parameters")
        if own is None:
            return out
        ids = {id(p) for p in own["params"]}
        return [own] + [{**g, "params": rest} for g in out if (rest := [p for p in g["params"] if id(p) not in ids])]

    def build_optimizer(self, model: nn.Module, cfg: Any) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.param_groups(model, cfg), lr=cfg.learning_rate,
                                 betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon)

    def on_step_begin(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        return None

    def forward_context(self, model: nn.Module) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def after_backward(self, model: nn.Module) -> None:
        return None

    def after_optimizer_step(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None

    def export(self, model: nn.Module, state: dict[str, torch.Tensor], folder: Path) -> dict[str, torch.Tensor]:
        return state


_REGISTRY: dict[str, Callable[..., Strategy]] = {}


def register_strategy(name: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        if name in _REGISTRY:
            raise ValueError(f"strategy {name!r} is already registered")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


@register_strategy("full")
class FullStrategy(BaseStrategy):
    """Full fine-tuning of the stage's roles (the paper's recipe): the base defaults, unchanged."""


def get_strategy(name: str, **options: Any) -> Strategy:
    """A new strategy by registered name (`pmod.peft` registers them all on import)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown fine-tuning strategy {name!r}; available: {list_strategies()}")
    return _REGISTRY[name](**options)


def list_strategies() -> list[str]:
    return sorted(_REGISTRY)
