"""Bone (Block Affine, arXiv 2409.15371) and MiSS, through peft's `MissConfig` (peft 0.19+ removed `BoneConfig`).

`bone` = MissConfig(init_weights="bat"), the original Block Affine Transformation. W [out, in] is cut into
r×r blocks W_jk (j over out/r row blocks, k over in/r column blocks); each row block j owns B_j ∈ R^{r×r}:

    W'_jk = W_jk + (W_jk B_j + B_j),   B ∈ R^{(out/r)×r×r} = 0 at init

`miss` = MissConfig(init_weights=True), the default of the successor: B ∈ R^{r×out}, ΔW[o, i] = B[i mod r, o]
(`init="mini"` shares a B ∈ R^{r×mini_r} across out / mini_r groups). Both have r·out trainable parameters per
linear (bat: (out/r)·r·r), leave the output unchanged at init and merge exactly. Default r = 64; bat needs
r | in and r | out for every target, checked up front with the offending layers named.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from pmod.peft.base import DEFAULT_ALSO_TRAIN, TARGETS, PeftStrategy, check_options, target_linears, target_regex
from pmod.peft.base import ADAPTER, with_bias
from pmod.peft.strategy import register_strategy

__all__ = ["BoneStrategy", "MissStrategy", "bat_delta", "miss_delta"]


def bat_delta(w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """ΔW of the Block Affine Transformation: w [out, in], b [out/r, r, r] -> [out, in]."""
    out_f, in_f = w.shape
    r = b.shape[-1]
    blocks = w.reshape(out_f // r, r, in_f // r, r).permute(0, 2, 1, 3)  # [out/r, in/r, r, r]: W_jk
    delta = blocks @ b.unsqueeze(1) + b.unsqueeze(1)  # W_jk B_j + B_j
    return delta.permute(0, 2, 1, 3).reshape(out_f, in_f)


def miss_delta(w: torch.Tensor, b: torch.Tensor, mini_r: int | None = None) -> torch.Tensor:
    """ΔW of MiSS: b [r, out] (or [r, mini_r], tiled over out) -> ΔW[o, i] = B[i mod r, o]."""
    out_f, in_f = w.shape
    if mini_r is not None:
        b = b.repeat(1, out_f // mini_r)  # [r, out]
    r = b.shape[0]
    cols = torch.arange(in_f, device=b.device) % r
    return b[cols].T  # [out, in]


class _MissBase(PeftStrategy):
    init: Any = True

    def __init__(self, r: int = 64, dropout: float = 0.0, mini_r: int = 1, targets: Iterable[str] = TARGETS,
                 also_train: Iterable[str] = DEFAULT_ALSO_TRAIN):
        super().__init__(targets, also_train)
        check_options(self.name, r=(int(r) == r and r >= 1, f"a positive integer, got {r}"),
                      dropout=(0 <= dropout < 1, f"in [0, 1), got {dropout}"), mini_r=(int(mini_r) == mini_r and mini_r >= 1, f"a positive integer, got {mini_r}"))
        self.r, self.dropout, self.mini_r = int(r), float(dropout), int(mini_r)
        self.options.update(r=self.r, dropout=self.dropout)

    def peft_config(self):
        from peft import MissConfig

        return MissConfig(r=self.r, miss_dropout=self.dropout, mini_r=self.mini_r, init_weights=self.init,
                          target_modules=target_regex(self.targets))

    def fits(self, out_f: int, in_f: int) -> bool:
        if self.init == "bat":
            return in_f % self.r == 0 and out_f % self.r == 0
        return self.r <= in_f and (self.init != "mini" or out_f % self.mini_r == 0)

    def check_shapes(self, model: nn.Module) -> None:
        bad = [f"{n} [{m.weight.shape[0]}x{m.weight.shape[1]}]" for n, m in target_linears(model, self.targets).items()
               if not self.fits(*m.weight.shape)]
        if bad:
            need = {"bat": f"r={self.r} to divide both in and out features (r x r blocks)",
                    "mini": f"r={self.r} <= in features and mini_r={self.mini_r} to divide out features"}
            raise ValueError(f"strategy {self.name!r} needs {need.get(self.init, f'r={self.r} <= in features')}; "
                             f"these targets do not fit: {', '.join(bad[:8])}{' ...' if len(bad) > 8 else ''} "
                             f"(choose another r, or restrict `targets`)")

    def adapt(self, model: nn.Module) -> None:
        self.check_shapes(model)
        self.inject(model)

    def delta(self, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def merge_linear(self, sub: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        w = sub["base_layer.weight"]
        return with_bias((w.float() + self.delta(w.float(), sub[f"miss_block.{ADAPTER}"].float())).to(w.dtype), sub)


@register_strategy("bone")
class BoneStrategy(_MissBase):
    """Block Affine (peft MiSS, init_weights="bat"). Options: r (64), dropout (0), targets, also_train."""

    init = "bat"

    def delta(self, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return bat_delta(w, b)


@register_strategy("miss")
class MissStrategy(_MissBase):
    """MiSS (peft's default, init_weights=True; `init="mini"` for its mini variant). Options: r (64), dropout (0),
    init (true | mini), mini_r (1), targets, also_train."""

    def __init__(self, init: bool | str = True, **options: Any):
        check_options(self.name, init=(init in (True, "mini"), f"true or 'mini', got {init!r}"))
        self.init = init
        super().__init__(**options)
        self.options.update(init=init, mini_r=self.mini_r)

    def delta(self, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return miss_delta(w, b, self.mini_r if self.init == "mini" else None)
