"""Multimodal front end: image loading and pixels (pad / anyres), anyres feature layout, chat templates.

`PmodProcessor` (in `pmod.multimodal.processor`) ties these to a tokenizer; it is exported from
`pmod` itself and not imported here, so this package stays free of tokenizer and config imports.
"""
from pmod.multimodal.anyres import (
    MERGE_TYPES,
    NEXT_GRIDS,
    anyres_num_tokens,
    anyres_pixel_values,
    assemble_anyres_features,
    divide_to_patches,
    grid_shape,
    pinpoints_from_grids,
    resize_and_pad,
    select_best_resolution,
    unpad_image,
    unpad_shape,
)
from pmod.multimodal.images import (
    CLIP_MEAN,
    CLIP_STD,
    DEFAULT_MAX_PIXELS,
    ImageLoadError,
    background_from_mean,
    center_crop_box,
    clip_preprocess,
    expand_to_square,
    load_image,
    pad_pixel_values,
    shortest_edge_size,
)
from pmod.multimodal.templates import IMAGE_PLACEHOLDER, TEMPLATES, Template, get_template, render, segments

__all__ = [
    # images
    "CLIP_MEAN", "CLIP_STD", "DEFAULT_MAX_PIXELS", "ImageLoadError", "load_image", "background_from_mean",
    "expand_to_square", "shortest_edge_size", "center_crop_box", "clip_preprocess", "pad_pixel_values",
    # anyres
    "MERGE_TYPES", "NEXT_GRIDS", "pinpoints_from_grids", "select_best_resolution", "grid_shape",
    "resize_and_pad", "divide_to_patches", "anyres_pixel_values", "unpad_shape", "unpad_image",
    "assemble_anyres_features", "anyres_num_tokens",
    # templates
    "IMAGE_PLACEHOLDER", "Template", "TEMPLATES", "get_template", "render", "segments",
]
