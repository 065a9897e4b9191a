"""Grokking tickets (arXiv 2310.19470) as sparse fine-tuning: a magnitude mask from a trained model, rewind,
train under the mask.

The official procedure trains densely past generalisation, scores |w| globally over the prunable weights, keeps
the top `keep` fraction (the code's `sparsity` / `prune_rate`, the fraction KEPT; default 0.4), rewinds to the
initial weights keeping the mask and trains W ⊙ M with AdamW, weight decay 0, betas (0.9, 0.98). Two modes:
- `weights` (faithful; for models trained from scratch, e.g. our tiny ones): score |W_trained|; the run's
  starting weights are the rewind point and pruned entries are zeroed: W = W_init ⊙ M.
- `delta` (our adaptation to pretrained models, whose weights a rewind to zero would destroy): score
  |W_trained − W_0|, keep W_0 everywhere and train only the kept entries.
The prunable weights are the target linears' weight matrices (global scope); `mask_from` names the trained model
(a checkpoint folder or a .safetensors file); `random=True` draws a mask of the same density (the control).
Masks live in the strategy (gradient masking after backward), never in the model: `torch.nn.utils.prune` would
rename weights to `weight_orig` and break checkpoint names. Pruned entries get zero gradient, so with weight
decay 0 Adam never moves them (m = v = 0 -> update 0).
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pmod.io.files import save_safetensors

from pmod.peft.base import DEFAULT_ALSO_TRAIN, TARGETS, PeftStrategy, check_options, copy_into, target_linears
from pmod.peft.strategy import register_strategy

__all__ = ["TicketStrategy", "density", "magnitude_mask", "random_mask", "read_weights"]


def magnitude_mask(scores: dict[str, torch.Tensor], keep: float) -> dict[str, torch.Tensor]:
    """Global top-`keep` mask over all tensors: exactly round(keep · total) True entries, every kept score >=
    every pruned one; ties at the threshold go to the lower position in (dict order, flat index)."""
    if not 0 < keep <= 1:
        raise ValueError(f"keep={keep}: the fraction of weights kept must be in (0, 1]")
    flat = torch.cat([s.detach().flatten().float().cpu() for s in scores.values()])  # [total]
    k = round(keep * flat.numel())
    order = torch.sort(flat, descending=True, stable=True).indices  # stable: equal scores keep index order
    keep_flat = torch.zeros(flat.numel(), dtype=torch.bool)
    keep_flat[order[:k]] = True
    return _unflatten(keep_flat, scores)


def random_mask(shapes: dict[str, torch.Tensor], keep: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """A uniformly random mask with exactly round(keep · total) True entries (the ticket's control)."""
    total = sum(s.numel() for s in shapes.values())
    g = torch.Generator().manual_seed(seed)
    keep_flat = torch.zeros(total, dtype=torch.bool)
    keep_flat[torch.randperm(total, generator=g)[: round(keep * total)]] = True
    return _unflatten(keep_flat, shapes)


def _unflatten(flat: torch.Tensor, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, i = {}, 0
    for name, t in like.items():
        out[name] = flat[i : i + t.numel()].view(t.shape).to(t.device)
        i += t.numel()
    return out


def density(masks: dict[str, torch.Tensor]) -> float:
    return sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())


def read_weights(source: str | os.PathLike, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """The named tensors of a trained model: a .safetensors file or a checkpoint folder in our layout."""
    from pmod.io.files import read_tensors, weight_files

    p = Path(source)
    files = [p] if p.is_file() else weight_files(p)
    names = list(names)
    found: dict[str, torch.Tensor] = {}
    for f in files:
        t = read_tensors(f)
        found.update({n: t[n] for n in names if n in t})
    missing = [n for n in names if n not in found]
    if missing:
        raise ValueError(f"mask_from={str(source)!r} lacks {len(missing)} target weight(s), e.g. {missing[:4]}; "
                         f"it must be a checkpoint of the same architecture in pmod's layout")
    return found


@register_strategy("ticket")
class TicketStrategy(PeftStrategy):
    """Options: mask_from (trained model; required unless random), keep (0.4), mode (delta | weights), random
    (False), seed (0), weight_decay (0), betas ((0.9, 0.98)), targets, also_train."""

    def __init__(self, mask_from: str | None = None, keep: float = 0.4, mode: str = "delta", random: bool = False, seed: int = 0,
                 weight_decay: float = 0.0, betas: Iterable[float] = (0.9, 0.98), targets: Iterable[str] = TARGETS,
                 also_train: Iterable[str] = DEFAULT_ALSO_TRAIN, mask_file: str | None = None):
        super().__init__(targets, also_train)
        betas = tuple(float(b) for b in betas)
        check_options(self.name, keep=(0 < keep <= 1, f"the kept fraction, in (0, 1], got {keep}"),
                      mode=(mode in ("delta", "weights"), f"delta or weights, got {mode!r}"),
                      mask_from=(bool(mask_from or random or mask_file), "a trained checkpoint to score (or random=true)"),
                      weight_decay=(weight_decay == 0 or mode == "weights",
                                    f"must be 0 in delta mode (decay would move pruned entries), got {weight_decay}"),
                      betas=(len(betas) == 2 and all(0 <= b < 1 for b in betas), f"two values in [0, 1), got {betas}"))
        self.mask_from, self.keep, self.mode, self.random, self.seed = mask_from, float(keep), mode, bool(random), int(seed)
        self.weight_decay, self.betas, self.mask_file = float(weight_decay), betas, mask_file
        self.options.update(mask_from=mask_from, keep=self.keep, mode=mode, random=self.random, seed=self.seed,
                            weight_decay=self.weight_decay, betas=list(betas), mask_file=mask_file)
        self.masks: dict[str, torch.Tensor] = {}  # parameter name -> bool mask

    def weights(self, model: nn.Module) -> dict[str, nn.Parameter]:
        return {f"{n}.weight": m.weight for n, m in target_linears(model, self.targets).items()}

    def compute_masks(self, model: nn.Module) -> dict[str, torch.Tensor]:
        params = self.weights(model)
        if self.mask_file:
            from safetensors.torch import load_file

            return {n: m.bool().to(params[n].device) for n, m in load_file(self.mask_file).items()}
        if self.random:
            return random_mask(params, self.keep, self.seed)
        trained = read_weights(self.mask_from, params)
        scores = {n: (trained[n].float() - (p.detach().float().cpu() if self.mode == "delta" else 0)).abs() for n, p in params.items()}
        return magnitude_mask(scores, self.keep)

    def adapt(self, model: nn.Module) -> None:
        """Derive the mask and rewind: the model's current weights are the rewind point (W_0)."""
        params = self.weights(model)
        self.masks = {n: m.to(params[n].device) for n, m in self.compute_masks(model).items()}
        if set(self.masks) != set(params):
            raise ValueError(f"strategy 'ticket': the mask covers {len(self.masks)} tensors, the targets are {len(params)}")
        if self.mode == "weights":
            with torch.no_grad():
                for n, p in params.items():
                    p.mul_(self.masks[n])  # W_init ⊙ M

    def adapter_params(self, model: nn.Module) -> dict[str, nn.Parameter]:
        return self.weights(model)

    def adapted_prefixes(self, state: dict[str, torch.Tensor]) -> list[str]:
        return []  # nothing to merge: the weights are plain

    def adapted_modules(self, model: nn.Module) -> dict[str, nn.Module]:
        return {}

    def after_backward(self, model: nn.Module) -> None:
        for n, p in self.weights(model).items():
            if p.grad is not None:
                p.grad.mul_(self.masks[n])

    def build_optimizer(self, model: nn.Module, cfg: Any) -> torch.optim.Optimizer:
        """AdamW; the masked weights with the ticket's betas and weight decay, the rest as the run says."""
        own = {"params": [p for p in self.weights(model).values() if p.requires_grad], "weight_decay": self.weight_decay,
               "betas": self.betas}
        return torch.optim.AdamW(self.param_groups(model, cfg, own=own), lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon)

    def trained_state(self, model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The fully trained roles, plus only the kept entries of each masked weight (`{name}.kept`, 1-D)."""
        out = super().trained_state(model, state)
        for n in self.weights(model):
            w = out.pop(n)
            out[f"{n}.kept"] = w[self.masks[n].to(w.device)].contiguous()
        return out

    def save(self, model: nn.Module, folder: Path, state: dict[str, torch.Tensor] | None = None) -> Path:
        out = super().save(model, folder, state)
        save_safetensors({n: m.cpu().contiguous() for n, m in self.masks.items()}, out / "mask.safetensors")
        return out

    def use_saved(self, folder: Path) -> None:
        self.mask_file = str(Path(folder) / "mask.safetensors")

    def load_trained_state(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        tensors = dict(tensors)
        kept = {k.removesuffix(".kept"): tensors.pop(k) for k in list(tensors) if k.endswith(".kept")}
        weights = self.weights(model)
        if set(kept) != set(weights):
            raise ValueError(f"strategy 'ticket': saved kept values for {len(kept)} weights, the targets are {len(weights)}")
        copy_into(model, tensors, self.name)
        with torch.no_grad():
            for n, p in weights.items():
                p[self.masks[n]] = kept[n].to(device=p.device, dtype=p.dtype)

    def touched(self, model: nn.Module) -> dict[str, int]:
        out = super().touched(model)
        out["adapter"] = sum(int(m.sum()) for m in self.masks.values())  # the kept entries only
        return out
