"""Vision towers: transformers' CLIPVisionModel (LLaVA's choice), its SiglipVisionModel, or a timm backbone.

A tower maps pixels [N, 3, S, S] to patch features [N, P, Cv] taken from the hidden state of
`select_layer` (-2: the penultimate layer, as LLaVA does), CLS dropped for `select_feature='patch'`.
"""
from __future__ import annotations

import torch
from torch import nn

from pmod.config import VisionConfig

__all__ = ["CLIPTower", "SiglipTower", "TimmTower", "build_vision_tower"]


class CLIPTower(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        from transformers import CLIPVisionConfig, CLIPVisionModel

        self.cfg = cfg
        self.model = CLIPVisionModel(CLIPVisionConfig(**cfg.clip))

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embeddings.patch_embedding.weight.dtype

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixels.to(self.dtype), output_hidden_states=True)
        feats = out.hidden_states[self.cfg.select_layer]  # [N, 1+P, Cv]
        return feats[:, 1:] if self.cfg.select_feature == "patch" else feats


class SiglipTower(CLIPTower):
    """SigLIP (LLaVA-OneVision's tower): no CLS token, so every selected token is a patch."""

    def __init__(self, cfg: VisionConfig):
        nn.Module.__init__(self)
        from transformers import SiglipVisionConfig, SiglipVisionModel

        self.cfg = cfg
        self.model = SiglipVisionModel(SiglipVisionConfig(**cfg.clip))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixels.to(self.dtype), output_hidden_states=True)
        return out.hidden_states[self.cfg.select_layer]  # [N, P, Cv]


class TimmTower(nn.Module):
    """Any timm ViT-style model that offers `forward_intermediates` (no pretrained download)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        import timm

        self.cfg = cfg
        self.model = timm.create_model(cfg.timm_model, pretrained=False, num_classes=0, **cfg.timm_kwargs)
        if self.model.num_features != cfg.hidden_size:
            raise ValueError(f"VisionConfig: timm_width={cfg.hidden_size} but {cfg.timm_model} has {self.model.num_features} "
                             f"features; declare its real width")
        depth = len(self.model.blocks)
        self.index = cfg.select_layer + depth if cfg.select_layer < 0 else cfg.select_layer - 1
        if not 0 <= self.index < depth:
            raise ValueError(f"VisionConfig.select_layer={cfg.select_layer} is outside a {depth}-block timm model")

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        keep_prefix = self.cfg.select_feature == "cls_patch"
        out = self.model.forward_intermediates(
            pixels.to(self.dtype), indices=[self.index], output_fmt="NLC", intermediates_only=True,
            return_prefix_tokens=keep_prefix, stop_early=True,
        )[0]
        if keep_prefix:
            feats, prefix = out
            return torch.cat([prefix, feats], dim=1)
        return out  # [N, P, Cv]


def build_vision_tower(cfg: VisionConfig) -> nn.Module:
    if cfg.backend in ("qwen2_5_vl", "qwen3_vl"):
        from pmod.modeling.vision_qwen import Qwen25VLTower, Qwen3VLTower

        return (Qwen25VLTower if cfg.backend == "qwen2_5_vl" else Qwen3VLTower)(cfg)
    return {"clip": CLIPTower, "siglip": SiglipTower, "timm": TimmTower}[cfg.backend](cfg)
