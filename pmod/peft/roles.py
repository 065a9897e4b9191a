"""Parameter roles of `PmodForConditionalGeneration`, read from names: what a stage or a strategy trains.

vision (the tower), projector (+ image_newline), router, embed, decoder (the layers), norm, head.
"""
from __future__ import annotations

from torch import nn

__all__ = ["ROLES", "param_role", "set_trainable", "trainable_summary"]

ROLES = ("vision", "projector", "router", "embed", "decoder", "norm", "head")


# name prefix -> role, as a table: a new part of the model is one row here
_PREFIX_ROLES = (("vision_tower.", "vision"), ("projector.", "projector"), ("image_newline", "projector"),
                 ("language_model.routers.", "router"), ("language_model.embed_tokens.", "embed"),
                 ("language_model.layers.", "decoder"), ("language_model.norm.", "norm"), ("lm_head.", "head"))


def param_role(name: str) -> str:
    """The role of a parameter of PmodForConditionalGeneration, from its name."""
    for prefix, role in _PREFIX_ROLES:
        if name.startswith(prefix) and (prefix.endswith(".") or name == prefix):
            return role
    raise ValueError(f"parameter {name!r} has no known role; expected a PmodForConditionalGeneration parameter")


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
