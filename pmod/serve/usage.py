"""Per-request efficiency (the `pmod` object of `usage`) and routing maps, read from one row of a packed prefill.

Kept tokens per layer come from the layout's route plans (what the MoD layers processed), FLOPs from
`pmod.flops.count_flops` (complete convention) on that row's counts, KV bytes from the cache's lengths.
"""
from __future__ import annotations

from pmod.cache import PmodCache
from pmod.config import PmodConfig
from pmod.flops import count_flops
from pmod.packing import Layout

__all__ = ["efficiency", "kv_usage", "prefill_efficiency", "routing_map"]


def prefill_efficiency(config: PmodConfig, layout: Layout, row: int) -> dict:
    """Row `row`'s prefill: vision tokens, kept per layer, kept ratio, prefill TFLOPs vs dense."""
    n_vision, n = layout.n_vision[row], layout.varlen.lens[row]
    ratios = config.mod_ratios
    kept = [layout.route(ratios[i]).k[row] if i in ratios and n_vision else n_vision
            for i in range(config.text.num_hidden_layers)]
    return efficiency(config, n_vision, n, kept)


def efficiency(config: PmodConfig, n_vision: int, n: int, kept: list[int]) -> dict:
    """The `pmod` usage of a prompt of `n` merged tokens, `n_vision` of them vision, `kept[l]` kept by layer l (a
    request continuing a cached prefix: the same as prefilling it whole, whose FLOPs these are)."""
    rep = count_flops(config, n_vision=n_vision, n_text=n - n_vision, convention="complete")
    return {
        "vision_tokens": n_vision,
        "kept_per_layer": kept,
        "kept_ratio": (sum(kept) / len(kept) / n_vision) if n_vision else 1.0,
        "prefill_tflops": rep.total / 1e12,
        "prefill_tflops_dense": rep.dense_total / 1e12,
    }


def kv_usage(cache: PmodCache, row: int) -> tuple[int, int]:
    """(bytes row `row` holds now, bytes a dense model would hold for the same tokens: every layer all of them)."""
    held = sum(cache.lengths[i][row] * cache.token_nbytes(i) for i in range(cache.num_layers) if cache.k[i] is not None)
    n = int(cache.positions[row])  # the row's full merged length so far
    dense = sum(n * cache.token_nbytes(i) for i in range(cache.num_layers) if cache.k[i] is not None)
    return held, dense


def routing_map(config: PmodConfig, out, row: int, counts: list[int] | None = None) -> dict | None:
    """The patches of each image of row `row` that each MoD layer kept: {grid, num_layers, images: [{image, layers:
    [{layer, ratio, kept}]}], layers: the first image's}, kept as patch indices (row-major in a grid x grid map; anyres:
    the image's base view, its first grid x grid tokens). `counts`: the row's tokens per image (None: one image).
    None without an image or routing records."""
    if not out.routing or out.vision_mask is None:
        return None
    v = config.vision
    grid = v.image_size // v.patch_size
    pos = out.vision_mask[row].nonzero().flatten().tolist()  # merged positions of the row's vision tokens
    starts, at = [], 0
    for j, n in enumerate(counts if counts is not None else [len(pos)]):
        if n >= grid * grid and at + n <= len(pos):
            starts.append((j, at))
        at += n
    if not starts:
        return None
    kept = [set(rec.kept[row].tolist()) for rec in out.routing]  # one host read per MoD layer
    images = []
    for j, s in starts:
        base = pos[s : s + grid * grid]
        images.append({"image": j, "layers": [{"layer": rec.layer, "ratio": rec.ratio,
                                               "kept": [i for i, p in enumerate(base) if p in k]}
                                              for rec, k in zip(out.routing, kept)]})
    return {"grid": grid, "num_layers": config.text.num_hidden_layers, "layers": images[0]["layers"], "images": images}
