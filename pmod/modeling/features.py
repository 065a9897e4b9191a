"""Image features of a LLaVA-style model: how many tokens each image gives the decoder, and the features themselves
(vision tower -> projector, anyres / OneVision assembly, Qwen's native tower, VisionZip's reduced features).

Functions of the model (`PmodForConditionalGeneration.image_token_counts` / `encode_images` call them).
Legend: N images (or crops), P patches, Cv tower width, C decoder width.
"""
from __future__ import annotations

import torch

from pmod.reduction import visionzip_split

__all__ = ["image_token_counts", "encode_images", "visionzip_tokens"]

ImageSize = tuple[int, int]  # (width, height)


def visionzip_tokens(model) -> tuple[int, int] | None:
    """VisionZip's (dominant, contextual) tokens per image under the model's reduction, or None."""
    r = model.reduction
    return visionzip_split(model.config.vision.num_patches, r.keep) if r is not None and r.method == "visionzip" else None


def image_token_counts(model, images, image_sizes: list[ImageSize] | None) -> list[int]:
    """Feature tokens of each image, from shapes and sizes alone (before the tower runs)."""
    n = _num_images(images)
    if model.config.image_aspect_ratio in ("pad", "square"):
        return [sum(visionzip_tokens(model) or (model.config.vision.num_patches,))] * n
    from pmod.multimodal.tokens import image_token_count

    if model.config.image_aspect_ratio == "native":  # Qwen2.5-VL: the merged grid of each image's tensor
        return [image_token_count(model.config, x, None) for x in ([images] if torch.is_tensor(images) else images)]
    sizes = _check_sizes(image_sizes, n)
    return [image_token_count(model.config, crops, s) for crops, s in zip(images, sizes)]


def encode_images(model, images, image_sizes: list[ImageSize] | None = None) -> torch.Tensor:
    """Pixels -> projected features of all images, concatenated in order: [sum n_i, C]."""
    tower_trainable = any(p.requires_grad for p in model.vision_tower.parameters())
    dev = next(model.vision_tower.parameters()).device
    if model.config.image_aspect_ratio == "native":  # Qwen2.5-VL: the tower merges and projects itself
        with torch.set_grad_enabled(torch.is_grad_enabled() and tower_trainable):
            return model.vision_tower([images] if torch.is_tensor(images) else list(images))  # [sum n_i, C]
    if model.config.image_aspect_ratio != "anyres":
        pixels = images if torch.is_tensor(images) else torch.stack(list(images))
        if pixels.dim() != 4:
            raise ValueError(f"images must be [N, 3, S, S] for image_aspect_ratio={model.config.image_aspect_ratio!r}, got {tuple(pixels.shape)}")
        with torch.set_grad_enabled(torch.is_grad_enabled() and tower_trainable):
            zipped = visionzip_tokens(model)
            if zipped is None:
                feats = model.vision_tower(pixels.to(dev))  # [N, P, Cv]
            else:  # VisionZip: [N, dominant + contextual, Cv]
                from pmod.reduction.visionzip import visionzip_features

                feats = visionzip_features(model.vision_tower, pixels.to(dev), *zipped)
        return model.projector(feats.to(_projector_dtype(model))).flatten(0, 1)  # [N*P, C]

    from pmod.multimodal.anyres import assemble_anyres_features

    crops = list(images)  # each [1+n_i, 3, S, S]
    sizes = _check_sizes(image_sizes, len(crops))
    with torch.set_grad_enabled(torch.is_grad_enabled() and tower_trainable):
        feats = model.vision_tower(torch.cat(crops).to(dev))  # [sum(1+n_i), P, Cv]
    feats = model.projector(feats.to(_projector_dtype(model))).split([c.shape[0] for c in crops])
    v = model.config.vision
    newline = getattr(model, "image_newline", None)
    if model.config.anyres_max_crops is not None:  # LLaVA-OneVision
        from pmod.multimodal.onevision import assemble_onevision_features

        return torch.cat([
            assemble_onevision_features(f, s, model.config.image_grid_pinpoints, v.image_size, v.image_size // v.patch_size,
                                        newline, model.config.anyres_max_crops)
            for f, s in zip(feats, sizes)
        ])
    return torch.cat([
        assemble_anyres_features(f, s, model.config.image_grid_pinpoints, v.image_size, v.image_size // v.patch_size,
                                 newline, model.config.mm_patch_merge_type)
        for f, s in zip(feats, sizes)
    ])


def _projector_dtype(model) -> torch.dtype:
    return next(model.projector.parameters()).dtype


def _num_images(images) -> int:
    if torch.is_tensor(images):
        return images.shape[0]
    return len(images)


def _check_sizes(image_sizes, n: int) -> list[ImageSize]:
    if image_sizes is None or len(image_sizes) != n:
        got = None if image_sizes is None else len(image_sizes)
        raise ValueError(f"anyres needs image_sizes with one (width, height) per image: {n} image(s), {got} size(s)")
    return [tuple(int(v) for v in s) for s in (image_sizes.tolist() if torch.is_tensor(image_sizes) else image_sizes)]
