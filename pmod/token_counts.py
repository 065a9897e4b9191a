"""How many tokens a prompt holds: per image (as the model lays images out), per decoder layer (after MoD's
routing), per sample of a batch. What `pmod.flops` and `pmod.kv_bytes` price; pure functions of the config.

Legend: n_v vision tokens, n_t text tokens of a sample; k_l = kept_count(n_v, r_l) the vision tokens MoD layer l keeps.
"""
from __future__ import annotations

from collections.abc import Sequence

from pmod.config import PmodConfig
from pmod.reduction.spec import ReductionSpec
from pmod.schedule import kept_count

__all__ = ["NATIVE_DEFAULT_SIZE", "Counts", "flat", "image_tokens", "samples", "scoring_flops", "tokens_per_layer"]

Counts = int | Sequence[int]  # per sample: one value repeated over the batch, or one per sample
NATIVE_DEFAULT_SIZE = (672, 672)  # Qwen2.5-VL has no grid to default to: the LLaVA-NeXT comparison size


def image_tokens(config: PmodConfig, image_size_wh: tuple[int, int] | None = None, images: int = 1) -> tuple[int, int]:
    """(vision tokens, S×S tower inputs) of `images` images as the model lays them out. pad / square: P = (S/p)²
    tokens and one tower input per image, whatever its size. anyres: the tokens of an image of `image_size_wh`
    (default: the largest grid pinpoint, e.g. 672×672 -> 2928 at LLaVA-NeXT-7B) over 1 + grid crops; LLaVA-OneVision's
    anyres_max_N shrinks that map (2304×2304 -> 7371 at 7B). native (Qwen2.5-VL): the merged patch grid of the image
    resized by smart_resize (default 672×672 -> 576 tokens), one tower input per image."""
    if images < 0:
        raise ValueError(f"images must be >= 0, got {images}")
    v = config.vision
    if config.image_aspect_ratio == "native":
        from pmod.multimodal.qwen2_5_vl import qwen_num_tokens

        c = v.clip
        n = qwen_num_tokens(tuple(image_size_wh or NATIVE_DEFAULT_SIZE), c.get("patch_size", 14), c.get("spatial_merge_size", 2),
                            v.min_pixels or 56 * 56, v.max_pixels or 28 * 28 * 1280)
        return images * n, images
    if config.image_aspect_ratio != "anyres":
        return images * v.num_patches, images
    from pmod.multimodal.anyres import anyres_num_tokens, grid_shape

    pins = config.image_grid_pinpoints
    size = tuple(image_size_wh) if image_size_wh else tuple(max(pins, key=lambda wh: wh[0] * wh[1]))
    gw, gh = grid_shape(size, pins, v.image_size)
    if config.anyres_max_crops is not None:
        from pmod.multimodal.onevision import onevision_num_tokens

        n = onevision_num_tokens(size, pins, v.image_size, v.image_size // v.patch_size, config.anyres_max_crops)
    else:
        n = anyres_num_tokens(size, pins, v.image_size, v.image_size // v.patch_size, config.mm_patch_merge_type)
    return images * n, images * (1 + gw * gh)


def tokens_per_layer(config: PmodConfig, n_vision: int, n_text: int, reduction: ReductionSpec | None = None) -> list[int]:
    """n_l: all n tokens in a dense layer, n_text + k_l in a MoD layer (k_l truncated as the official code does); with
    a training-free `reduction`, of the vision tokens it leaves at layer l (`ReductionSpec.vision_per_layer`)."""
    ratios, L = config.mod_ratios, config.text.num_hidden_layers
    vis = reduction.vision_per_layer(L, n_vision, config.vision.num_patches) if reduction else [n_vision] * L
    return [n_text + (kept_count(v, ratios[i]) if i in ratios else v) for i, v in enumerate(vis)]


def scoring_flops(config: PmodConfig, reduction: ReductionSpec | None, n_vision: int, n_text: int) -> list[int]:
    """Per layer, what ranking the vision tokens costs: FastV (at layer K-1) and PyramidDrop (at a stage layer) run
    k_proj over the layer's n tokens, q_proj on the last one and its n scores: 2·n·d·g·e + 2·d·h·e + 2·h·e·n."""
    t, L = config.text, config.text.num_hidden_layers
    out = [0] * L
    if reduction is None or reduction.method not in ("fastv", "pyramiddrop"):
        return out
    vis = [n_vision] + reduction.vision_per_layer(L, n_vision)  # vis[l]: vision tokens at layer l's input, pre-drop
    he, ge = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    for drop in reduction.layers:
        at = drop - 1 if reduction.method == "fastv" else drop
        n = n_text + vis[at]
        out[at] += 2 * n * t.hidden_size * ge + 2 * t.hidden_size * he + 2 * he * n
    return out


def samples(n_vision: Counts, n_text: Counts, batch: int, images: Counts | None = 0) -> list[tuple[int, int, int]]:
    """Per-sample (n_vision, n_text, n_images), checked: ints >= 0, n > 0, equal-length lists, batch >= 1."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    args = {"n_vision": n_vision, "n_text": n_text, "n_images": images}
    lists = [x for x in args.values() if not isinstance(x, int)]
    size = len(lists[0]) if lists else batch
    if any(len(x) != size for x in lists) or (lists and batch not in (1, size)):
        raise ValueError(f"per-sample lists must agree in length (and with batch={batch}): {args}")
    rows = list(zip(*[[x] * size if isinstance(x, int) else list(x) for x in args.values()]))
    for v, t, i in rows:
        if not all(isinstance(x, int) and x >= 0 for x in (v, t, i)) or v + t == 0:
            raise ValueError(f"token and image counts must be integers >= 0 with n_vision + n_text > 0, got "
                             f"n_vision={v!r}, n_text={t!r}, n_images={i!r}")
    return rows


def flat(x: Counts) -> list[int]:
    return [x] if isinstance(x, int) else list(x)
