"""GradNormLoRP (arXiv 2412.19616): weight-normalised low-rank weights with GaLore-projected gradients.

Paper form (`mode="dora"`, the default): DoRA adapters on the target linears (peft, `use_dora=True`),

    W = m ⊙ (W0 + s·B A) / ‖W0 + s·B A‖_row,   m = ‖W0‖_row, B = 0 at init  (function unchanged at init)

and the gradients of the 2-D factors A, B projected GaLore-style (`pmod.peft.galore`) before AdamW. The official
fine-tuning example uses r = 8, alpha = 16, dropout 0.1; its projection rank defaults to 128, which a factor of
rank 8 clamps to 8: then the projection is a full-rank change of Adam's basis (GaLore's behaviour, kept), and
the memory saving comes from the factorisation and 8-bit states.

Memory-saving full-weight form (`mode="full"`, the paper's pre-training setting): each target linear becomes
W = g ⊙ V / ‖V‖_row with V (initialised to W0) trained through projected gradients and g ∈ R^{out} beside it;
per m×n matrix the state is 2·r·max(m, n) + r·min(m, n) elements instead of AdamW's 2·m·n.

Defaults (official names): rank 128, update_proj_gap 200, scale 0.25, proj_type std; optim_bits 32 or 8
(bitsandbytes blockwise states). Both forms merge into plain linears.

We follow the paper, not the public code (which never writes one optimizer's update back, calls a missing
method in its 8-bit variant, and in another keeps a full weight copy and resets the learned magnitude each step).
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pmod.peft.base import DEFAULT_ALSO_TRAIN, TARGETS, PeftStrategy, check_options, target_linears, with_bias
from pmod.peft.galore import PROJ_TYPES, GaLoreAdamW
from pmod.peft.lora import LoraStrategy, lora_merge
from pmod.peft.strategy import register_strategy

__all__ = ["GradNormLoRPStrategy", "WeightNormLinear"]


class WeightNormLinear(nn.Module):
    """y = x (g ⊙ V / ‖V‖_row)ᵀ + b. Built from a Linear: V is its weight (same tensor), g its row norms, so
    g / ‖V‖ is exactly 1 at init and the output is bitwise unchanged. The norm is not detached."""

    adapter_layer_names = ("weight", "magnitude")  # what trains (`declared_adapter_params`); the bias does not

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight  # V [out, in]
        self.bias = linear.bias
        self.magnitude = nn.Parameter(torch.linalg.norm(linear.weight.detach(), dim=1))  # g [out]

    def merged_weight(self) -> torch.Tensor:
        return weight_norm(self.weight, self.magnitude)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.merged_weight(), self.bias)


def weight_norm(v: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return v * (g / torch.linalg.norm(v, dim=1).clamp_min(1e-12)).unsqueeze(1)


@register_strategy("gradnormlorp")
class GradNormLoRPStrategy(LoraStrategy):
    """Options: mode (dora | full), rank (128), update_proj_gap (200), scale (0.25), proj_type (std),
    optim_bits (32 | 8), lora_r (8), lora_alpha (16), lora_dropout (0.1), targets, also_train."""

    use_dora = True

    def __init__(self, mode: str = "dora", rank: int = 128, update_proj_gap: int = 200, scale: float = 0.25,
                 proj_type: str = "std", optim_bits: int = 32, lora_r: int = 8, lora_alpha: float = 16.0,
                 lora_dropout: float = 0.1, targets: Iterable[str] = TARGETS, also_train: Iterable[str] = DEFAULT_ALSO_TRAIN):
        super().__init__(r=lora_r, alpha=lora_alpha, dropout=lora_dropout, targets=targets, also_train=also_train)
        check_options(self.name, mode=(mode in ("dora", "full"), f"dora or full, got {mode!r}"),
                      rank=(int(rank) == rank and rank >= 1, f"a positive integer, got {rank}"),
                      update_proj_gap=(int(update_proj_gap) == update_proj_gap and update_proj_gap >= 1, f"a positive integer, got {update_proj_gap}"),
                      scale=(scale >= 0, f">= 0, got {scale}"), proj_type=(proj_type in PROJ_TYPES, f"one of {PROJ_TYPES}, got {proj_type!r}"),
                      optim_bits=(optim_bits in (8, 32), f"8 or 32, got {optim_bits}"))
        self.mode, self.rank, self.gap, self.scale = mode, int(rank), int(update_proj_gap), float(scale)
        self.proj_type, self.bits = proj_type, int(optim_bits)
        self.options = {"mode": mode, "rank": self.rank, "update_proj_gap": self.gap, "scale": self.scale, "proj_type": proj_type,
                        "optim_bits": self.bits, "lora_r": self.r, "lora_alpha": self.alpha, "lora_dropout": self.dropout,
                        "targets": list(self.targets), "also_train": list(self.also_train)}

    # --- structure ------------------------------------------------------------------------------
    def adapt(self, model: nn.Module) -> None:
        if self.mode == "dora":
            return super().adapt(model)
        for name, lin in target_linears(model, self.targets).items():
            if type(lin) is not nn.Linear:
                raise ValueError(f"strategy {self.name!r}: {name} is already adapted ({type(lin).__name__})")
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, WeightNormLinear(lin))

    def projected_params(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """The 2-D matrices whose gradients are projected: DoRA's A and B, or the full-weight V."""
        return {n: p for n, p in self.adapter_params(model).items() if p.ndim == 2}

    def adapted_prefixes(self, state: dict[str, torch.Tensor]) -> list[str]:
        if self.mode == "dora":
            return super().adapted_prefixes(state)
        return sorted(k.removesuffix(".magnitude") for k in state if k.endswith(".magnitude"))

    def merge_linear(self, sub: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.mode == "dora":
            return lora_merge(sub, self.scaling, dora=True)
        return with_bias(weight_norm(sub["weight"].float(), sub["magnitude"].float()).to(sub["weight"].dtype), sub, "bias")

    def save(self, model: nn.Module, folder: Path, state: dict[str, torch.Tensor] | None = None) -> Path:
        return super().save(model, folder, state) if self.mode == "dora" else PeftStrategy.save(self, model, folder, state)

    # --- optimizer ------------------------------------------------------------------------------
    def build_optimizer(self, model: nn.Module, cfg: Any) -> torch.optim.Optimizer:
        """GaLoreAdamW: one projected group (the 2-D adapter matrices, weight decay cfg.weight_decay), the rest
        as the base strategy groups them (no decay on 1-D tensors, projector lr)."""
        projected = [p for p in self.projected_params(model).values() if p.requires_grad]
        groups = self.param_groups(model, cfg, own={"params": projected, "rank": self.rank, "update_proj_gap": self.gap,
                                                    "scale": self.scale, "proj_type": self.proj_type,
                                                    "weight_decay": cfg.weight_decay})
        return GaLoreAdamW(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
                           bits=self.bits)
