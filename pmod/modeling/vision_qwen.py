"""Qwen2.5-VL's vision transformer, run through transformers (window attention, 2-D RoPE, 2x2 patch merger).

Images come in as one tensor each, [gt, gh, gw, m*m, Dp]: the merged token grid (gt, gh, gw), the m*m patches
that merge into each token (m = spatial_merge_size), and Dp = channels * temporal_patch_size * patch**2 values per
patch. Flattened, this is exactly transformers' `pixel_values` order for that image, and the shape alone gives
its `image_grid_thw` = (gt, gh*m, gw*m), so the model needs no extra argument. The tower's output is already in
the decoder's width (its merger is the projector). Legend: Np patches, Nv merged tokens, C decoder width.
"""
from __future__ import annotations

import torch
from torch import nn

from pmod.config import VisionConfig

__all__ = ["Qwen25VLTower", "Qwen3VLTower", "merged_grid", "check_qwen_pixels"]


def merged_grid(pixels: torch.Tensor) -> tuple[int, int, int]:
    """(gt, gh, gw) merged tokens of one image tensor [gt, gh, gw, m*m, Dp]."""
    return tuple(int(v) for v in pixels.shape[:3])


class Qwen25VLTower(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

        self.cfg = cfg
        self.model = Qwen2_5_VisionTransformerPretrainedModel(Qwen2_5_VLVisionConfig(**cfg.clip))
        self.merge = int(cfg.clip.get("spatial_merge_size", 2))

    @property
    def dtype(self) -> torch.dtype:
        return self.model.patch_embed.proj.weight.dtype

    def forward(self, images: list[torch.Tensor]) -> torch.Tensor:
        """images: one [gt, gh, gw, m*m, Dp] tensor per image -> merged features [sum_i gt*gh*gw, C]."""
        m = self.merge
        grid = torch.tensor([[g[0], g[1] * m, g[2] * m] for g in map(merged_grid, images)], dtype=torch.long)  # [n, 3]
        pixels = torch.cat([x.reshape(-1, x.shape[-1]) for x in images])  # [Np, Dp]
        dev = self.model.patch_embed.proj.weight.device
        return self.model(pixels.to(device=dev, dtype=self.dtype), grid_thw=grid.to(dev)).pooler_output  # [Nv, C]


class Qwen3VLTower(Qwen25VLTower):
    """Qwen3-VL's vision transformer (learned, interpolated position embeddings; no windows). It also returns the
    DeepStack features: one [Nv, C] map per `deepstack_visual_indexes` block, added to the vision tokens after
    decoder layers 0, 1, ... (transformers' `_deepstack_process`)."""

    def __init__(self, cfg: VisionConfig):
        nn.Module.__init__(self)
        from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLVisionConfig
        from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

        self.cfg = cfg
        self.model = Qwen3VLVisionModel(Qwen3VLVisionConfig(**cfg.clip))
        self.merge = int(cfg.clip.get("spatial_merge_size", 2))

    def forward(self, images: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        m = self.merge
        grid = torch.tensor([[g[0], g[1] * m, g[2] * m] for g in map(merged_grid, images)], dtype=torch.long)  # [n, 3]
        pixels = torch.cat([x.reshape(-1, x.shape[-1]) for x in images])  # [Np, Dp]
        dev = self.model.patch_embed.proj.weight.device
        out = self.model(pixels.to(device=dev, dtype=self.dtype), grid_thw=grid.to(dev))
        return out.pooler_output, list(out.deepstack_features)  # [Nv, C], n_deep x [Nv, C]


def check_qwen_pixels(images, cfg: VisionConfig) -> None:
    """Each image a floating [gt, gh, gw, m*m, Dp] tensor matching the tower's patch geometry (before the tower runs)."""
    c = cfg.clip
    m, p = int(c.get("spatial_merge_size", 2)), int(c.get("patch_size", 14))
    dp = int(c.get("in_channels", 3)) * int(c.get("temporal_patch_size", 2)) * p * p
    items = [images] if torch.is_tensor(images) else list(images)
    for i, x in enumerate(items):
        if not torch.is_tensor(x) or not x.dtype.is_floating_point or x.dim() != 5 or tuple(x.shape[3:]) != (m * m, dp) \
                or min(x.shape[:3]) < 1:
            got = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"images[{i}] is {got}; a Qwen2.5-VL model takes one floating tensor per image shaped "
                             f"[gt, gh, gw, {m * m}, {dp}] (merged grid, patches per token, values per patch), as its "
                             f"processor makes them")
        if x.device.type != "meta" and not bool(torch.isfinite(x).all()):
            raise ValueError(f"images[{i}] holds NaN or Inf pixel values; check the preprocessing")


