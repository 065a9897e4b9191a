"""What every fine-tuning strategy shares: the linears it may adapt, the roles that train beside it, how it
saves / loads / merges what it trained, and how optimizer memory is measured.

Targets are the decoder linears `language_model.layers.{i}.self_attn.{q,k,v,o}_proj` and
`.mlp.{gate,up,down}_proj` (MoD layers included). Routers (`language_model.routers.{i}`, hidden -> 1) are never
adapted nor perturbed: their top-k choice is discontinuous. By default the routers and the projector train
fully beside the adapters (p-MoD trains them; LLaVA's LoRA recipe puts them in `modules_to_save`); we keep
them trainable in place instead of peft's `modules_to_save` copies, so parameter names never change.

A trained strategy is saved next to the base checkpoint as `strategy/strategy.json` (name, options, what it
touched) plus `strategy/trained.safetensors` (adapters, masks, magnitudes, and the fully trained roles under
their model names); `load_trained(model, folder)` re-applies it to the base model, `strategy.merge(model)`
folds it into a plain model.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from pmod.io.atomic import atomic_write_text
from pmod.io.files import save_safetensors

from pmod.peft.memory import optimizer_state_bytes, optimizer_state_bytes_8bit, unwrap_optimizer
from pmod.peft.roles import ROLES, param_role, set_trainable
from pmod.peft.strategy import BaseStrategy, get_strategy

__all__ = [
    "ADAPTER",
    "DEFAULT_ALSO_TRAIN",
    "STRATEGY_DIR",
    "TARGETS",
    "PeftStrategy",
    "check_options",
    "copy_into",
    "declared_adapter_params",
    "load_trained",
    "optimizer_state_bytes",
    "optimizer_state_bytes_8bit",
    "target_linears",
    "target_regex",
    "trainable_count",
    "unwrap_optimizer",
    "with_bias",
    "write_meta",
]

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_ALSO_TRAIN = ("router", "projector")
STRATEGY_DIR = "strategy"
ADAPTER = "default"  # peft's adapter name; one adapter per model here
_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def _check_targets(targets: Iterable[str]) -> tuple[str, ...]:
    targets = tuple(targets)
    bad = [t for t in targets if t not in _PARENT]
    if bad or not targets:
        raise ValueError(f"targets {list(targets)}: expected a non-empty subset of {list(TARGETS)} (routers are never targets)")
    return targets


def target_regex(targets: Iterable[str] = TARGETS) -> str:
    """peft `target_modules` regex, relative to `model.language_model` (the adapters go in the decoder only)."""
    targets = _check_targets(targets)
    alts = "|".join(sorted(f"{_PARENT[t]}\\.{t}" for t in targets))
    return rf"layers\.\d+\.({alts})"


def target_linears(model: nn.Module, targets: Iterable[str] = TARGETS) -> dict[str, nn.Module]:
    """{full module name: module} of the targeted decoder linears, in layer order."""
    pat = re.compile(target_regex(targets))
    return {f"language_model.{n}": m for n, m in model.language_model.named_modules() if pat.fullmatch(n)}


def check_options(name: str, **checks: tuple[bool, str]) -> None:
    """Raise one error naming every bad option: checks = {option: (ok, what was expected)}."""
    bad = [f"{k}: {msg}" for k, (ok, msg) in checks.items() if not ok]
    if bad:
        raise ValueError(f"strategy {name!r}: " + "; ".join(bad))


def declared_adapter_params(model: nn.Module, adapter: str = ADAPTER) -> dict[str, nn.Parameter]:
    """{name: parameter} of the adapters, found by the attribute names each adapted layer declares in
    `adapter_layer_names` (peft's tuner-layer protocol: `lora_A`, `lora_B`, `lora_magnitude_vector`, `miss_block`,
    ...; our own adapted layers declare it too), never by a substring of parameter names."""
    ids = set()
    for m in model.modules():
        for attr in getattr(m, "adapter_layer_names", ()):
            holder = getattr(m, attr, None)
            if isinstance(holder, nn.Parameter):
                ids.add(id(holder))
            elif isinstance(holder, (nn.ModuleDict, nn.ParameterDict)) and adapter in holder:
                sub = holder[adapter]
                ids |= {id(p) for p in ([sub] if isinstance(sub, nn.Parameter) else sub.parameters())}
    return {n: p for n, p in model.named_parameters() if id(p) in ids}


def with_bias(weight: torch.Tensor, sub: dict[str, torch.Tensor], bias_key: str = "base_layer.bias") -> dict[str, torch.Tensor]:
    """A merged linear's state: the merged weight, and the linear's own bias passed through (no strategy here
    adapts a bias)."""
    return {"weight": weight, **({"bias": sub[bias_key]} if bias_key in sub else {})}


def trainable_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class PeftStrategy(BaseStrategy):
    """Base of the strategies that adapt the target linears. Subclasses set `options` and implement
    `adapt(model)` (add adapters / masks), `adapter_params(model)` (what `adapt` added or selects; by default
    what the adapted layers declare),
    `adapted_prefixes(state)` and `merge_linear(sub) -> {"weight", "bias"?}` (the closed-form merge of one
    adapted linear from its own state dict: the same code serves `export` on a gathered state and `merge`)."""

    name = "peft"

    def __init__(self, targets: Iterable[str] = TARGETS, also_train: Iterable[str] = DEFAULT_ALSO_TRAIN):
        self.targets = _check_targets(targets)
        self.also_train = tuple(also_train)
        unknown = sorted(set(self.also_train) - set(ROLES))
        if unknown:
            raise ValueError(f"strategy {self.name!r}: also_train names unknown role(s) {unknown}; expected some of {ROLES}")
        self.options: dict[str, Any] = {"targets": list(self.targets), "also_train": list(self.also_train)}

    # --- what subclasses provide ----------------------------------------------------------------
    def adapt(self, model: nn.Module) -> None:
        raise NotImplementedError

    def adapter_params(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """What `adapt` added: by default the parameters the adapted layers declare (`declared_adapter_params`)."""
        return declared_adapter_params(model)

    def adapted_prefixes(self, state: dict[str, torch.Tensor]) -> list[str]:
        """Module names (in `state`'s naming) of the adapted linears."""
        return sorted(k.removesuffix(".base_layer.weight") for k in state if k.endswith(".base_layer.weight"))

    def merge_linear(self, sub: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def inject(self, model: nn.Module) -> None:
        """Add `self.peft_config()`'s adapters through peft, into the decoder only: its module names are what the
        target regex matches, and peft's transformers-v5 weight conversion (which expects a PreTrainedModel at the
        root) has nothing to convert there."""
        from peft import inject_adapter_in_model

        if hasattr(model.language_model, "peft_config"):
            raise ValueError(f"strategy {self.name!r}: the model already carries peft adapters; start from the base model")
        inject_adapter_in_model(self.peft_config(), model.language_model)

    # --- the training seam ----------------------------------------------------------------------
    def prepare(self, model: nn.Module, roles: set[str]) -> nn.Module:
        """Add the adapters, then train exactly: adapters + (also_train ∩ the stage's roles)."""
        self.adapt(model)
        model.train(model.training)  # new adapter modules (dropout) follow the model's mode
        set_trainable(model, set(self.also_train) & set(roles))
        for p in self.adapter_params(model).values():
            p.requires_grad_(True)
        return model

    def touched(self, model: nn.Module) -> dict[str, int]:
        """Trainable elements by kind: 'adapter' and each fully trained role."""
        adapters = {id(p) for p in self.adapter_params(model).values()}
        out: dict[str, int] = {}
        for n, p in model.named_parameters():
            if p.requires_grad:
                kind = "adapter" if id(p) in adapters else param_role(n)
                out[kind] = out.get(kind, 0) + p.numel()
        return out

    def export(self, model: nn.Module, state: dict[str, torch.Tensor], folder: Path) -> dict[str, torch.Tensor]:
        """Write `folder/strategy/` (what was trained) and return the merged, plain state for the checkpoint."""
        self.save(model, Path(folder), state)
        return self.merge_state(state)

    # --- save / load / merge ----------------------------------------------------------------------
    def trained_state(self, model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Tensors that, with the base checkpoint, rebuild the trained model (adapters + trained roles). Values come
        from `state` when given (the loop's state gathered from FSDP / ZeRO-3 shards), else from the model."""
        names = {n for n, p in model.named_parameters() if p.requires_grad} | set(self.adapter_params(model))
        state = model.state_dict() if state is None else state
        return {n: t.detach().cpu().contiguous() for n, t in state.items() if n in names}

    def save(self, model: nn.Module, folder: Path, state: dict[str, torch.Tensor] | None = None) -> Path:
        """Write `folder/strategy/`: strategy.json and trained.safetensors (see `trained_state`)."""
        out = write_meta(folder, self.name, self.options, self.touched(model))
        save_safetensors(self.trained_state(model, state), out / "trained.safetensors")
        return out

    def use_saved(self, folder: Path) -> None:
        """Called by `load_trained` before `adapt`: read anything `adapt` needs from the saved folder."""

    def load_trained_state(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        """Put saved tensors into a model that `adapt` has just prepared; unknown or missing names fail loudly."""
        missing = sorted(set(self.adapter_params(model)) - set(tensors))
        if missing:
            raise ValueError(f"strategy {self.name!r}: the saved tensors lack {len(missing)} adapter(s), e.g. {missing[:6]}")
        copy_into(model, tensors, self.name)

    def merge_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A plain state dict: every adapted linear folded to `weight` (+ `bias`), adapter keys gone."""
        out = dict(state)
        for prefix in self.adapted_prefixes(state):
            sub = {k[len(prefix) + 1:]: out.pop(k) for k in list(out) if k.startswith(prefix + ".")}
            for k, v in self.merge_linear(sub).items():
                out[f"{prefix}.{k}"] = v
        return out

    def adapted_modules(self, model: nn.Module) -> dict[str, nn.Module]:
        """{name: module} of the target linears that currently carry an adapter."""
        return {n: m for n, m in target_linears(model, self.targets).items() if type(m) is not nn.Linear}

    @torch.no_grad()
    def merge(self, model: nn.Module) -> nn.Module:
        """Fold the adapters into plain `nn.Linear`s, in place; returns the model (now free of training code)."""
        for name, module in self.adapted_modules(model).items():
            merged = self.merge_linear(dict(module.state_dict()))
            w = merged["weight"]
            lin = nn.Linear(w.shape[1], w.shape[0], bias="bias" in merged, device=w.device, dtype=w.dtype)
            lin.weight.copy_(w)
            if "bias" in merged:
                lin.bias.copy_(merged["bias"])
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, lin)
        if hasattr(model.language_model, "peft_config"):
            del model.language_model.peft_config
        return model


def write_meta(folder: str | Path, name: str, options: dict[str, Any], touched: dict[str, int]) -> Path:
    """`folder/strategy/strategy.json`: the strategy, its options (enough to rebuild it) and what it trained."""
    out = Path(folder) / STRATEGY_DIR
    out.mkdir(parents=True, exist_ok=True)
    meta = {"strategy": name, "options": options, "touched": touched, "format": 1}
    atomic_write_text(out / "strategy.json", json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return out


def copy_into(model: nn.Module, tensors: dict[str, torch.Tensor], who: str) -> None:
    """Copy named tensors into the model's parameters / buffers; names the model lacks fail loudly."""
    own = dict(model.state_dict(keep_vars=True))
    unknown = sorted(set(tensors) - set(own))
    if unknown:
        raise ValueError(f"strategy {who!r}: saved tensors do not fit the model: unknown {unknown[:8]}")
    with torch.no_grad():
        for k, v in tensors.items():
            own[k].copy_(v)


def load_trained(model: nn.Module, folder: str | Path, merge: bool = False) -> tuple[nn.Module, Any]:
    """Re-apply a saved strategy (`folder` or `folder/strategy`) to its base model; `merge=True` also folds it
    in. Returns (model, strategy)."""
    folder = Path(folder)
    d = folder if (folder / "strategy.json").is_file() else folder / STRATEGY_DIR
    if not (d / "strategy.json").is_file():
        raise FileNotFoundError(f"{folder}: no strategy.json (looked in {folder} and {folder / STRATEGY_DIR})")
    meta = json.loads((d / "strategy.json").read_text())
    strategy = get_strategy(meta["strategy"], **meta["options"])
    strategy.use_saved(d)
    strategy.adapt(model)
    model.train(model.training)
    tensors = load_file(str(d / "trained.safetensors")) if (d / "trained.safetensors").is_file() else {}
    strategy.load_trained_state(model, tensors)
    if merge:
        strategy.merge(model)
    return model, strategy
