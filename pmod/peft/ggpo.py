"""LoRA-GGPO (arXiv 2502.14538 v1) and its successor LoRA-MGPO (v2, the authors' released code), on peft LoRA.

Both perturb the frozen base weight of every LoRA linear during training forwards, to steer LoRA toward flat
minima; neither touches routers (not LoRA linears) nor runs in eval.

GGPO (no official code; from the v1 paper and a public port). After each backward, per LoRA linear (out rows,
n = in features, s = alpha / r, ΔW = s·B A):
    combined[i] = sqrt( mean_i'(‖W0[i',:]‖)² + ‖ΔW[i,:]‖² )
    gnorm[i]    = ‖ s·(B ∇A + ∇B A)[i,:] ‖
and in the following training forwards y += x Eᵀ ⊙ c with E ~ N(0, 1) [out, in] drawn from a generator seeded by
(seed, step, layer) (gradient checkpointing recomputes the same E; no global RNG is consumed) and
    c[i] = (sigma·combined[i] + beta·gnorm[i]²) / d,   d = sqrt(n) (`normalize="sqrt_in"`) or 1 ("none").
The exact v1 normalisation could not be checked, hence the option. Defaults sigma = 0.03, beta = 0.01.
Step 0 has no statistics yet, so no perturbation.

MGPO (official trainer). Per LoRA linear, from Adam's first moments m_A, m_B:
    V = s·(m_B A + B m_A),   ε = −rho · V / ‖V‖_F · min(1 / ḡ, 10)
ε is added to W0 for the step's forwards and backwards, and W0 is restored from a snapshot right after the
backward (not by subtraction, which drifts in low precision); then ḡ ← b·ḡ + (1 − b)·‖s(∇B A + B ∇A)‖_F (first
value taken as is). Defaults rho = 0.01, Adam beta1 = 0.8, b = 0.8 (LLM generation; 0.05 / 0.9 / 0.9 for NLU).

rho = 0 (MGPO) or sigma = beta = 0 (GGPO) is plain LoRA bit for bit.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pmod.peft.base import ADAPTER, check_options, unwrap_optimizer
from pmod.peft.lora import LoraStrategy
from pmod.peft.strategy import register_strategy

__all__ = ["LoraGGPOStrategy", "LoraMGPOStrategy", "lora_delta_grad"]


def _factors(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight, layer.get_base_layer().weight


def lora_delta_grad(layer: nn.Module, scaling: float) -> torch.Tensor | None:
    """s·(B ∇A + ∇B A) [out, in]: the gradient LoRA's factors induce on ΔW; None before any backward."""
    a, b, _ = _factors(layer)
    if a.grad is None or b.grad is None:
        return None
    return scaling * (b.detach() @ a.grad + b.grad @ a.detach())


class _LoraLoop(LoraStrategy):
    """LoRA plus the step counter and LoRA-layer lookup both perturbation methods use."""

    def __init__(self, **lora_options: Any):
        super().__init__(**lora_options)
        self.step = 0
        self._lora: dict[str, nn.Module] = {}

    def prepare(self, model: nn.Module, roles: set[str]) -> nn.Module:
        super().prepare(model, roles)
        self._lora = self.lora_layers(model)
        return model

    def on_step_begin(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.step = step


@register_strategy("lora-ggpo")
class LoraGGPOStrategy(_LoraLoop):
    """Options: sigma (0.03), beta (0.01), normalize (sqrt_in | none), seed (0), and LoRA's (r, alpha, dropout,
    targets, also_train)."""

    def __init__(self, sigma: float = 0.03, beta: float = 0.01, normalize: str = "sqrt_in", seed: int = 0, **lora_options: Any):
        super().__init__(**lora_options)
        check_options(self.name, sigma=(sigma >= 0, f">= 0, got {sigma}"), beta=(beta >= 0, f">= 0, got {beta}"),
                      normalize=(normalize in ("sqrt_in", "none"), f"sqrt_in or none, got {normalize!r}"))
        self.sigma, self.beta, self.normalize, self.seed = float(sigma), float(beta), normalize, int(seed)
        self.options.update(sigma=self.sigma, beta=self.beta, normalize=normalize, seed=self.seed)
        self.coef: dict[str, torch.Tensor] = {}  # c [out] per LoRA linear, from the last backward
        self._on = False
        self._hooks: list[Any] = []

    @property
    def enabled(self) -> bool:
        return self.sigma > 0 or self.beta > 0

    def prepare(self, model: nn.Module, roles: set[str]) -> nn.Module:
        super().prepare(model, roles)
        if self.enabled:
            for idx, (name, layer) in enumerate(self._lora.items()):
                self._hooks.append(layer.register_forward_hook(self._hook(name, idx)))
        return model

    def _hook(self, name: str, idx: int):
        def add_noise(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
            c = self.coef.get(name)
            if not (self._on and module.training and c is not None):
                return None
            x = args[0]
            w = module.get_base_layer().weight
            gen = torch.Generator(device=w.device).manual_seed((self.seed * 1_000_003 + self.step) * 100_003 + idx)
            e = torch.randn(w.shape, generator=gen, device=w.device, dtype=torch.float32).to(x.dtype)  # [out, in]
            return out + F.linear(x, e) * c.to(out.dtype)
        return add_noise

    def noise_coefficients(self, layer: nn.Module) -> torch.Tensor | None:
        """c [out] from the current gradients (the formula in the module docstring)."""
        dg = lora_delta_grad(layer, self.scaling)
        if dg is None:
            return None
        a, b, w0 = _factors(layer)
        with torch.no_grad():
            base = torch.linalg.norm(w0.float(), dim=1).mean()
            delta = torch.linalg.norm(self.scaling * (b.float() @ a.float()), dim=1)  # ‖ΔW[i,:]‖
            combined = torch.sqrt(base**2 + delta**2)
            gnorm = torch.linalg.norm(dg.float(), dim=1)
            d = math.sqrt(w0.shape[1]) if self.normalize == "sqrt_in" else 1.0
            return (self.sigma * combined + self.beta * gnorm**2) / d

    def forward_context(self, model: nn.Module) -> contextlib.AbstractContextManager:
        @contextlib.contextmanager
        def perturbed():
            self._on = True
            try:
                yield
            finally:
                self._on = False
        return perturbed() if self.enabled else contextlib.nullcontext()

    def after_backward(self, model: nn.Module) -> None:
        if not self.enabled:
            return
        for name, layer in self._lora.items():
            c = self.noise_coefficients(layer)
            if c is not None:
                self.coef[name] = c

    def state_dict(self) -> dict[str, Any]:
        return {"coef": {k: v.cpu() for k, v in self.coef.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        dev = {n: layer.get_base_layer().weight.device for n, layer in self._lora.items()}
        self.coef = {k: v.to(dev.get(k, "cpu")) for k, v in state["coef"].items()}


@register_strategy("lora-mgpo")
class LoraMGPOStrategy(_LoraLoop):
    """Options: rho (0.01), adam_beta1 (0.8; overrides the run's), ema (0.8), max_inverse (10), and LoRA's."""

    def __init__(self, rho: float = 0.01, adam_beta1: float = 0.8, ema: float = 0.8, max_inverse: float = 10.0, **lora_options: Any):
        super().__init__(**lora_options)
        check_options(self.name, rho=(rho >= 0, f">= 0, got {rho}"), adam_beta1=(0 <= adam_beta1 < 1, f"in [0, 1), got {adam_beta1}"),
                      ema=(0 <= ema < 1, f"in [0, 1), got {ema}"), max_inverse=(max_inverse > 0, f"> 0, got {max_inverse}"))
        self.rho, self.adam_beta1, self.ema, self.max_inverse = float(rho), float(adam_beta1), float(ema), float(max_inverse)
        self.options.update(rho=self.rho, adam_beta1=self.adam_beta1, ema=self.ema, max_inverse=self.max_inverse)
        self.gbar: dict[str, float] = {}
        self._snapshot: dict[str, torch.Tensor] = {}

    def build_optimizer(self, model: nn.Module, cfg: Any) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.param_groups(model, cfg), lr=cfg.learning_rate, betas=(self.adam_beta1, cfg.adam_beta2),
                                 eps=cfg.adam_epsilon)

    def perturbation(self, name: str, layer: nn.Module, optimizer: torch.optim.Optimizer) -> torch.Tensor | None:
        """ε [out, in] for this layer, or None (no Adam moments yet, or no ḡ)."""
        a, b, _ = _factors(layer)
        state = unwrap_optimizer(optimizer).state
        if name not in self.gbar or "exp_avg" not in state.get(a, {}) or "exp_avg" not in state.get(b, {}):
            return None
        with torch.no_grad():
            v = self.scaling * (state[b]["exp_avg"].float() @ a.float() + b.float() @ state[a]["exp_avg"].float())
            norm = torch.linalg.norm(v)
            if norm == 0:
                return None
            return -self.rho * v / norm * min(1.0 / max(self.gbar[name], 1e-30), self.max_inverse)

    def on_step_begin(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        super().on_step_begin(step, model, optimizer)
        self.restore()
        if self.rho == 0:
            return
        for name, layer in self._lora.items():
            eps = self.perturbation(name, layer, optimizer)
            if eps is None:
                continue
            w = layer.get_base_layer().weight
            self._snapshot[name] = w.detach().clone()
            with torch.no_grad():
                w.add_(eps.to(w.dtype))

    def restore(self) -> None:
        """Put back every perturbed base weight from its snapshot (bitwise)."""
        for name, saved in self._snapshot.items():
            with torch.no_grad():
                self._lora[name].get_base_layer().weight.copy_(saved)
        self._snapshot.clear()

    def after_backward(self, model: nn.Module) -> None:
        self.restore()
        if self.rho == 0:
            return
        for name, layer in self._lora.items():
            dg = lora_delta_grad(layer, self.scaling)
            if dg is None:
                continue
            g = float(torch.linalg.norm(dg.float()))
            self.gbar[name] = g if name not in self.gbar else self.ema * self.gbar[name] + (1 - self.ema) * g

    def after_optimizer_step(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.restore()  # normally a no-op: after_backward restored already

    def state_dict(self) -> dict[str, Any]:
        return {"gbar": dict(self.gbar)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gbar = dict(state["gbar"])
