"""LLaVA's training stages as parameter roles (`pmod.peft.roles`)."""
from __future__ import annotations

from pmod.peft.roles import ROLES

__all__ = ["stage_roles"]


def stage_roles(stage: str, train_vision_tower: bool = False) -> set[str]:
    """LLaVA's stages: pre-training trains the projector only; fine-tuning trains everything but the
    vision tower (the LLM, projector and MoD routers: the official p-MoD recipe)."""
    roles = {"projector"} if stage == "pretrain" else set(ROLES) - {"vision"}
    return roles | ({"vision"} if train_vision_tower else set())
