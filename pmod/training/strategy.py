"""The seam for fine-tuning strategies: what trains, how the optimizer is built, hooks around each step.

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

`model` is always the unwrapped `PmodForConditionalGeneration`. Parameter roles come from names:
vision (the tower), projector (+ image_newline), router, embed, decoder (the layers), norm, head.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

__all__ = ["ROLES", "param_role", "stage_roles", "set_trainable", "trainable_summary", "Strategy", "BaseStrategy",
           "FullStrategy", "register_strategy", "get_strategy", "list_strategies"]

ROLES = ("vision", "projector", "router", "embed", "decoder", "norm", "head")


def param_role(name: str) -> str:
    """The role of a parameter of PmodForConditionalGeneration, from its name."""
    if name.startswith("vision_tower."):
        return "vision"
    if name.startswith("projector.") or name == "image_newline":
        return "projector"
    if name.startswith("language_model.routers."):
        return "router"
    if name.startswith("language_model.embed_tokens."):
        return "embed"
    if name.startswith("language_model.layers."):
        return "decoder"
    if name.startswith("language_model.norm."):
        return "norm"
    if name.startswith("lm_head."):
        return "head"
    raise ValueError(f"parameter {name!r} has no known role; expected a PmodForConditionalGeneration parameter")


def stage_roles(stage: str, train_vision_tower: bool = False) -> set[str]:
    """LLaVA's stages: pre-training trains the projector only; fine-tuning trains everything but the
    vision tower (the LLM, projector and MoD routers: the official p-MoD recipe)."""
    roles = {"projector"} if stage == "pretrain" else set(ROLES) - {"vision"}
    return roles | ({"vision"} if train_vision_tower else set())


def set_trainable(model: nn.Module, roles: set[str]) -> None:
    """requires_grad = (role in roles) for every parameter."""
    unknown = set(roles) - set(ROLES)
    if unknown:
        raise ValueError(f"unknown parameter role(s) {sorted(unknown)}; expected {ROLES}")
    for name, p in model.named_parameters():
        p.requires_grad_(param_role(name) in roles)


def trainable_summary(model: nn.Module) -> dict[str, tuple[int, int]]:
    """{role: (trainable elements, total elements)}, for the start-of-run log."""
    out: dict[str, list[int]] = {}
    for name, p in model.named_parameters():
        t = out.setdefault(param_role(name), [0, 0])
        t[0] += p.numel() if p.requires_grad else 0
        t[1] += p.numel()
    return {k: (v[0], v[1]) for k, v in out.items()}


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

    def param_groups(self, model: nn.Module, cfg: Any) -> list[dict[str, Any]]:
        """AdamW groups: no weight decay on 1-D tensors (biases, norms, image_newline), as transformers'
        Trainer; the projector, vision tower and routers at their own rate when set (LLaVA's
        mm_projector_lr and mm_vision_tower_lr; `router_lr` keeps Adam from saturating TanhNorm at
        the high rates of small from-scratch models)."""
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
        return out

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


def _load_plugins() -> None:
    """Strategies defined elsewhere in pmod (e.g. `pmod.peft`) register themselves on import."""
    import importlib

    for module in ("pmod.peft",):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name is None or not module.startswith(e.name):
                raise


def get_strategy(name: str, **options: Any) -> Strategy:
    if name not in _REGISTRY:
        _load_plugins()
    if name not in _REGISTRY:
        raise ValueError(f"unknown fine-tuning strategy {name!r}; available: {list_strategies()}")
    return _REGISTRY[name](**options)


def list_strategies() -> list[str]:
    _load_plugins()
    return sorted(_REGISTRY)
