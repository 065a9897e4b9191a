"""LISA, Layerwise Importance Sampled AdamW (arXiv 2403.17919; LMFlow's reference code).

Every K = `interval_steps` optimizer steps (at step % K == 0) all decoder layers are frozen and γ =
`activated_layers` of them, drawn uniformly without replacement, are unfrozen; the embeddings, final norm and
lm_head always train (for p-MoD also the routers and the projector: `always_train`). Defaults (LMFlow):
γ = 2, K = 20. The draw of interval j depends on (seed, j) only, so runs and resumes repeat it.

What we do differently from the reference code, on purpose:
- the optimizer is built over every layer before anything is frozen (freezing first left later layers out);
- frozen layers get `grad = None` (the loop zeroes with set_to_none=True), which AdamW skips entirely: no
  momentum or weight-decay drift, so a frozen layer is bitwise unchanged over its interval;
- `reset_state` (default on) drops the Adam state of inactive layers at each switch, so the state holds
  2·(|E| + |H| + |norm| + |always-on| + γ·|layer|) elements, the size the paper's memory claim assumes.
Distributed: DDP needs find_unused_parameters=True (the TrainConfig default), FSDP use_orig_params=True;
DeepSpeed ZeRO-3 partitions parameters in a way that breaks LISA's freezing and is refused.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pmod.peft.base import check_options, unwrap_optimizer, write_meta
from pmod.peft.roles import ROLES, set_trainable, trainable_summary
from pmod.peft.strategy import BaseStrategy, register_strategy

__all__ = ["LisaStrategy", "lisa_layers"]

ALWAYS = ("embed", "head", "norm", "router", "projector")


def lisa_layers(num_layers: int, activated: int, seed: int, interval: int) -> list[int]:
    """The γ layers of interval `interval`, ascending: uniform without replacement, a function of (seed, interval)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + interval)
    return sorted(torch.randperm(num_layers, generator=g)[:activated].tolist())


@register_strategy("lisa")
class LisaStrategy(BaseStrategy):
    """Options: activated_layers (2), interval_steps (20), reset_state (True), always_train (embed, head, norm,
    router, projector), seed (None: the run's seed)."""

    def __init__(self, activated_layers: int = 2, interval_steps: int = 20, reset_state: bool = True,
                 always_train: Iterable[str] = ALWAYS, seed: int | None = None):
        always_train = tuple(always_train)
        check_options(self.name, activated_layers=(int(activated_layers) == activated_layers and activated_layers >= 1, f"a positive integer, got {activated_layers}"),
                      interval_steps=(int(interval_steps) == interval_steps and interval_steps >= 1, f"a positive integer, got {interval_steps}"),
                      always_train=(set(always_train) <= set(ROLES) - {"decoder"}, f"roles other than 'decoder' among {ROLES}, got {list(always_train)}"))
        self.gamma, self.K, self.reset_state = int(activated_layers), int(interval_steps), bool(reset_state)
        self.always, self.seed = always_train, seed
        self.options = {"activated_layers": self.gamma, "interval_steps": self.K, "reset_state": self.reset_state,
                        "always_train": list(always_train), "seed": seed}
        self.active: list[int] | None = None
        self._layers: list[nn.Module] = []

    def check_distributed(self, distributed_type: str, zero_stage: int | None) -> None:
        if zero_stage == 3:
            raise ValueError("strategy 'lisa' cannot run under DeepSpeed ZeRO-3: it partitions parameters across ranks, and "
                             "switching requires_grad on partitioned layers is known to break; use ZeRO-2, DDP or FSDP "
                             "(use_orig_params=True)")

    def prepare(self, model: nn.Module, roles: set[str]) -> nn.Module:
        """Everything LISA may train is trainable now, so the optimizer (and DDP) see every layer; the first
        `on_step_begin` freezes all but γ layers."""
        if "decoder" not in roles:
            raise ValueError(f"strategy 'lisa' samples decoder layers, but this stage trains only {sorted(roles)}")
        self._layers = list(model.language_model.layers)
        if self.gamma > len(self._layers):
            raise ValueError(f"strategy 'lisa': activated_layers={self.gamma} exceeds the model's {len(self._layers)} layers")
        set_trainable(model, (set(self.always) | {"decoder"}) & set(roles))
        self.active = None
        return model

    def build_optimizer(self, model: nn.Module, cfg: Any) -> torch.optim.Optimizer:
        if self.seed is None:
            self.seed = int(cfg.seed)
        return super().build_optimizer(model, cfg)

    def layers_for(self, step: int) -> list[int]:
        return lisa_layers(len(self._layers), self.gamma, self.seed or 0, step // self.K)

    def on_step_begin(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if self.active is not None and step % self.K:
            return
        self.active = self.layers_for(step)  # a fresh interval, or the first step after a resume
        opt = unwrap_optimizer(optimizer)
        for i, layer in enumerate(self._layers):
            on = i in self.active
            for p in layer.parameters():
                p.requires_grad_(on)
                if not on:
                    p.grad = None
                    if self.reset_state:
                        opt.state.pop(p, None)

    def export(self, model: nn.Module, state: dict[str, torch.Tensor], folder: Path) -> dict[str, torch.Tensor]:
        """LISA trains full weights: the exported checkpoint is the result; `strategy/strategy.json` records how."""
        touched = {k: t for k, (t, _) in trainable_summary(model).items() if t}
        write_meta(folder, self.name, self.options, touched)
        return state

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "active": self.active}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed = state["seed"]
        self.active = None  # re-derived (and re-applied to requires_grad) at the next on_step_begin
