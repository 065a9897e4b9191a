"""LoRA through peft, injected into the decoder of our plain `nn.Module` model.

    y = W x + s · B A x,   s = alpha / r,   A ∈ R^{r×in} (peft's Kaiming-uniform), B ∈ R^{out×r} = 0 at init

so the output is unchanged at init and each adapted linear adds r·(in + out) parameters. Defaults are the
LLaVA / p-MoD training arguments (r = 64, alpha = 16, dropout = 0.05; peft's own are r = 8, alpha = 8), with r sized
to the decoder: `default_rank(d) = min(64, max(4, d // 16))`, LLaVA's 64 from 1024 wide up and an adapter of about
1/8 of each linear's parameters below (r = 64 on a 128-wide decoder would train as many parameters as the linears
it adapts). An explicit r that trains at least half as many parameters as the adapted linears hold is warned about.
`use_dora` switches to DoRA's weight-normalised form (used by GradNormLoRP):

    W' = m ⊙ (W + s B A) / ‖W + s B A‖_row,   m = ‖W‖_row at init

Merging is the closed form above, applied to a (possibly gathered) state dict; `merge(model)` gives plain
`nn.Linear`s with the same logits. Besides our `strategy/` files, the adapter is also written in peft's format
(`strategy/adapter/`, keys relative to `model.language_model`).
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import warnings

import torch
from torch import nn

from pmod.peft.base import DEFAULT_ALSO_TRAIN, TARGETS, PeftStrategy, check_options, target_linears, target_regex
from pmod.peft.base import ADAPTER, with_bias
from pmod.peft.strategy import register_strategy

__all__ = ["LoraStrategy", "default_rank", "lora_merge"]

LLAVA_RANK = 64


def default_rank(hidden_size: int) -> int:
    """LoRA's default r for a decoder `hidden_size` wide: LLaVA's 64 from 1024 up, d / 16 below (at least 4), so that
    an adapter holds about 2r/d = 1/8 of a square linear's parameters rather than all of them."""
    return min(LLAVA_RANK, max(4, hidden_size // 16))


def lora_merge(sub: dict[str, torch.Tensor], scaling: float, dora: bool = False) -> dict[str, torch.Tensor]:
    """One peft LoRA linear's state (`base_layer.weight`, `lora_A.default.weight`, ...) -> {weight, bias?}."""
    w = sub["base_layer.weight"]
    a, b = sub[f"lora_A.{ADAPTER}.weight"], sub[f"lora_B.{ADAPTER}.weight"]
    v = w.float() + scaling * (b.float() @ a.float())  # [out, in]
    if dora:
        m = sub[f"lora_magnitude_vector.{ADAPTER}.weight"].float()  # [out]
        v = v * (m / torch.linalg.norm(v, dim=1)).unsqueeze(1)
    return with_bias(v.to(w.dtype), sub)


@register_strategy("lora")
class LoraStrategy(PeftStrategy):
    """LoRA on the decoder linears (peft); routers and projector train fully unless `also_train` says otherwise.

    Options: r (default: `default_rank` of the decoder's width, 64 at 7B), alpha (16), dropout (0.05), targets (all
    seven linears), also_train (router, projector)."""

    use_dora = False

    def __init__(self, r: int | None = None, alpha: float = 16.0, dropout: float = 0.05,
                 targets: Iterable[str] = TARGETS, also_train: Iterable[str] = DEFAULT_ALSO_TRAIN):
        super().__init__(targets, also_train)
        check_options(self.name, r=(r is None or (int(r) == r and r >= 1), f"a positive integer, got {r}"),
                      alpha=(alpha > 0, f"positive, got {alpha}"), dropout=(0 <= dropout < 1, f"in [0, 1), got {dropout}"))
        self.r, self.alpha, self.dropout = None if r is None else int(r), float(alpha), float(dropout)
        self.options.update(r=self.r, alpha=self.alpha, dropout=self.dropout)

    def _size_rank(self, model: nn.Module) -> None:
        """Fix r before the adapters exist: the default from the decoder's width; an explicit one is checked."""
        if self.r is None:
            self.r = default_rank(model.config.text.hidden_size)
            self.options["r"] = self.r  # strategy.json records the r that was trained
            return
        linears = list(target_linears(model, self.targets).values())
        base = sum(m.in_features * m.out_features for m in linears)
        added = sum(self.r * (m.in_features + m.out_features) for m in linears)
        if base and added >= 0.5 * base:
            warnings.warn(f"strategy {self.name!r}: r={self.r} on a {model.config.text.hidden_size}-wide decoder trains "
                          f"{added:,} adapter parameters, {100 * added / base:.0f} % of the {base:,} in the linears it "
                          f"adapts; a low-rank adapter that size saves nothing (default here: r="
                          f"{default_rank(model.config.text.hidden_size)})", stacklevel=3)

    @property
    def scaling(self) -> float:
        if self.r is None:
            raise ValueError(f"strategy {self.name!r}: r is sized to the model when the adapters are added (adapt)")
        return self.alpha / self.r

    def peft_config(self):
        from peft import LoraConfig

        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=target_regex(self.targets),
                          use_dora=self.use_dora, bias="none")

    def adapt(self, model: nn.Module) -> None:
        self._size_rank(model)
        self.inject(model)

    def lora_layers(self, model: nn.Module) -> dict[str, nn.Module]:
        """{name: peft LoRA linear} of the adapted target linears."""
        return self.adapted_modules(model)

    def merge_linear(self, sub: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return lora_merge(sub, self.scaling, self.use_dora)

    def save(self, model: nn.Module, folder: Path, state: dict[str, torch.Tensor] | None = None) -> Path:
        from peft import get_peft_model_state_dict
        from pmod.io.files import save_safetensors

        out = super().save(model, folder, state)
        adapter = out / "adapter"
        adapter.mkdir(exist_ok=True)
        self.peft_config().save_pretrained(str(adapter))
        lm_state = None if state is None else {k.removeprefix("language_model."): v for k, v in state.items()
                                               if k.startswith("language_model.")}
        peft_state = get_peft_model_state_dict(model.language_model, state_dict=lm_state)
        state = {k: v.detach().cpu().contiguous() for k, v in peft_state.items()}
        save_safetensors(state, adapter / "adapter_model.safetensors")
        return out
