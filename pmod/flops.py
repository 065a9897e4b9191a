"""FLOPs and KV-cache accounting for a p-MoD model and its dense twin: pure functions of config and token counts.

Efficiency claims are only comparable under a stated convention, so every report names the one it used:

* ``paper`` (PMOD_SPEC §8), the one behind the paper's TFLOPs: prefill, LLM only, linears only, at 2 FLOPs
  per multiply-add; per layer 2·n_l·(2·d·h·e + 2·d·g·e + 3·d·m) (= 2·n_l·(4d² + 3dm) without GQA), plus
  lm_head 2·n·d·V over all positions; no attention scores, no vision tower, projector or decode.
* ``complete``: every matrix product a forward runs, counted as torch's FlopCounterMode counts them:
  linears (bias adds, norms, activations, RoPE and softmax are not multiply-adds and are not counted),
  QKᵀ and AV over the full n_q × n_kv rectangle (FlopCounterMode ignores the causal mask for SDPA; a causal
  kernel does about half the score work, see `attention_flops(causal=True)`), the router (d -> 1) on the
  vision tokens of MoD layers, lm_head (all positions, or the last with `last_only`), and optionally the
  CLIP tower, the projector and s decode steps (each: every layer runs 1 token against its own cache).

Legend: d hidden, m intermediate, L layers, V vocab, h query heads, g kv heads, e head dim; n = n_text +
n_vision tokens of a sample; r_l, k_l = kept_count(n_vision, r_l) ratio and kept vision tokens of MoD layer
l; n_l = n_text + (k_l or n_vision) tokens layer l processes in prefill, c_l its KV length; s decode steps;
tower: D width, M intermediate, p patch, P = (S/p)² patches (+1 CLS), I images. Counts are summed over a batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from pmod.config import PmodConfig, TextConfig, VisionConfig
from pmod.schedule import kept_count

__all__ = [
    "CONVENTIONS", "KV_CONVENTIONS", "FlopReport", "KVReport", "linear_flops", "attention_flops",
    "layer_linear_macs", "tokens_per_layer", "decoder_flops_from_tokens", "vision_flops", "projector_flops",
    "count_flops", "kv_cache_bytes", "format_table", "format_flops", "flops_unit", "image_tokens",
]

CONVENTIONS = {
    "paper": "paper: prefill, LLM linears + lm_head, no attention scores",
    "complete": "complete: all matmuls incl. attention scores (full rectangle), router",
}
KV_CONVENTIONS = ("paper", "paper_int", "complete")
# transformers.CLIPVisionConfig defaults, for keys a VisionConfig.clip dict leaves out
_CLIP = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_channels=3, image_size=224,
             patch_size=32)
Counts = int | Sequence[int]
_UNITS = (("TFLOPs", 1e12), ("GFLOPs", 1e9))


NATIVE_DEFAULT_SIZE = (672, 672)  # Qwen2.5-VL has no grid to default to: the LLaVA-NeXT comparison size


def flops_unit(x: float) -> tuple[str, float]:
    """(name, scale): TFLOPs from 1e12 on (7B shapes), GFLOPs below (a tiny model shows 0.81 GFLOPs, not 0.00)."""
    return next(((n, s) for n, s in _UNITS if abs(x) >= s), _UNITS[-1])


def format_flops(x: float, unit: str | None = None, digits: int = 2) -> str:
    """'8.38 TFLOPs', '812.45 GFLOPs': `x` FLOPs in `unit` (default: `flops_unit(x)`)."""
    name, scale = flops_unit(x) if unit is None else next((n, s) for n, s in _UNITS if n == unit)
    return f"{x / scale:.{digits}f} {name}"


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


def linear_flops(n: int, d_in: int, d_out: int) -> int:
    """2·n·d_in·d_out: n rows through a d_in -> d_out linear (the bias add is not counted)."""
    return 2 * n * d_in * d_out


def attention_flops(n_q: int, n_kv: int, heads: int, head_dim: int, *, causal: bool = False) -> int:
    """QKᵀ plus AV: 4·h·e·(query-key pairs). Pairs = n_q·n_kv, the rectangle FlopCounterMode counts for SDPA;
    `causal=True` counts only unmasked pairs, the queries being the last n_q of n_kv positions."""
    pairs = n_q * (n_kv - n_q) + n_q * (n_q + 1) // 2 if causal else n_q * n_kv
    return 4 * heads * head_dim * pairs


def layer_linear_macs(text: TextConfig) -> int:
    """Multiply-adds per token of a decoder layer's linears: q, o (d·h·e each), k, v (d·g·e), gate, up, down."""
    d, e = text.hidden_size, text.head_dim
    return 2 * d * e * (text.num_attention_heads + text.num_key_value_heads) + 3 * d * text.intermediate_size


def tokens_per_layer(config: PmodConfig, n_vision: int, n_text: int) -> list[int]:
    """n_l: all n tokens in a dense layer, n_text + k_l in a MoD layer (k_l truncated as the official code does)."""
    ratios = config.mod_ratios
    return [n_text + (kept_count(n_vision, ratios[i]) if i in ratios else n_vision)
            for i in range(config.text.num_hidden_layers)]


def decoder_flops_from_tokens(
    config: PmodConfig, tokens: Sequence[int], kv_len: Sequence[int] | None = None, *,
    router_tokens: Sequence[int] | None = None, attention: bool = True,
) -> list[int]:
    """FLOPs of each decoder layer given its query tokens n_l, key/value length c_l (default n_l: prefill) and
    router tokens: 2·n_l·macs + 4·h·e·n_l·c_l + 2·d·router_l. `attention=False` gives the paper's count."""
    t = config.text
    kv_len = tokens if kv_len is None else kv_len
    router_tokens = [0] * len(tokens) if router_tokens is None else router_tokens
    if not len(tokens) == len(kv_len) == len(router_tokens) == t.num_hidden_layers:
        raise ValueError(f"decoder_flops_from_tokens: need {t.num_hidden_layers} entries per list, got "
                         f"{len(tokens)}, {len(kv_len)}, {len(router_tokens)}")
    macs = layer_linear_macs(t)
    return [2 * n * macs + (attention_flops(n, c, t.num_attention_heads, t.head_dim) if attention else 0)
            + linear_flops(r, t.hidden_size, 1) for n, c, r in zip(tokens, kv_len, router_tokens)]


def _clip(vision: VisionConfig) -> dict:
    if vision.backend not in ("clip", "siglip"):
        raise ValueError(f"vision FLOPs are counted for backend='clip' or 'siglip' only, got {vision.backend!r}; "
                         "pass include_vision=False")
    return {**_CLIP, **({"patch_size": 16} if vision.backend == "siglip" else {}), **vision.clip}


def vision_flops(vision: VisionConfig, n_images: int, *, layers: int | None = None) -> int:
    """CLIP ViT on I images of 1 + P tokens: patch conv 2·P·D·3·p², per encoder layer 4 linears D×D, scores
    (non-causal, 4·(1+P)²·D) and fc1/fc2 D×M. `layers` defaults to all of them: transformers' CLIPVisionModel
    runs every layer even when LLaVA reads hidden_states[-2]; pass fewer if the tower is truncated."""
    c = _clip(vision)
    dim, mlp, p = c["hidden_size"], c["intermediate_size"], c["patch_size"]
    patches = (c["image_size"] // p) ** 2
    n = patches + (vision.backend == "clip")  # CLIP adds a CLS token; SigLIP (its pooling head not counted) has none
    layer = 4 * linear_flops(n, dim, dim) + attention_flops(n, n, 1, dim) + 2 * linear_flops(n, dim, mlp)
    conv = linear_flops(patches, c["num_channels"] * p * p, dim)
    return n_images * (conv + (c["num_hidden_layers"] if layers is None else layers) * layer)


def projector_flops(config: PmodConfig, n_features: int) -> int:
    """mlp2x_gelu: Linear(D -> d), GELU, Linear(d -> d); linear: Linear(D -> d), on every selected feature."""
    dim, d = _clip(config.vision)["hidden_size"], config.text.hidden_size
    extra = linear_flops(n_features, d, d) if config.projector_type == "mlp2x_gelu" else 0
    return linear_flops(n_features, dim, d) + extra


def _samples(n_vision: Counts, n_text: Counts, batch: int, images: Counts | None = 0) -> list[tuple[int, int, int]]:
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


@dataclass(frozen=True)
class FlopReport:
    """FLOPs of one `count_flops` call, summed over the batch. Two partitions of `total`: by part (vision +
    projector + decoder + lm_head) and by phase (prefill + decode). `dense` is the same count for the dense
    twin (every layer processes all tokens); per-layer lists include prefill and decode."""

    convention: str
    per_layer: list[int]
    tokens_per_layer: list[int]  # prefill tokens n_l
    kv_len_per_layer: list[int]  # cache length c_l after prefill and decode
    decoder: int
    lm_head: int
    vision: int = 0
    projector: int = 0
    decode: int = 0  # decoder layers + lm_head of the decode steps
    batch: int = 1
    dense: FlopReport | None = field(default=None, repr=False)

    @property
    def total(self) -> int:
        return self.vision + self.projector + self.decoder + self.lm_head

    @property
    def prefill(self) -> int:
        return self.total - self.decode

    @property
    def dense_total(self) -> int:
        return self.total if self.dense is None else self.dense.total

    @property
    def ratio(self) -> float:
        return self.total / self.dense_total

    def summary(self) -> str:
        unit, scale = flops_unit(self.dense_total)
        parts = ", ".join(f"{k} {getattr(self, k) / scale:.4f}" for k in ("decoder", "lm_head", "vision",
                                                                          "projector", "decode"))
        return (f"{format_flops(self.total, unit)} = {100 * self.ratio:.1f} % of dense "
                f"{format_flops(self.dense_total, unit)} [convention {CONVENTIONS[self.convention]}; batch "
                f"{self.batch}; {unit}: {parts}]")

    __str__ = summary


def count_flops(
    config: PmodConfig, n_vision: Counts, n_text: Counts, convention: str = "paper", *,
    include_vision: bool = False, decode_steps: int = 0, batch: int = 1, last_only: bool = False,
    n_images: Counts | None = None, vision_layers: int | None = None,
) -> FlopReport:
    """FLOPs of a forward (see the module docstring for both conventions), with the dense twin in `.dense`.

    n_vision, n_text: per sample, an int (repeated `batch` times) or a list. n_images: S×S images through
    the tower per sample; by default n_vision / (tokens per image), which anyres layouts must pass
    explicitly (1 + crops). Only `complete` takes include_vision, decode_steps and last_only."""
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown convention {convention!r}; expected one of {tuple(CONVENTIONS)}")
    if convention == "paper" and (include_vision or decode_steps or last_only):
        raise ValueError("convention 'paper' counts the LLM prefill over all positions only; use 'complete' for "
                         "include_vision, decode_steps or last_only")
    if decode_steps < 0:
        raise ValueError(f"decode_steps must be >= 0, got {decode_steps}")
    _samples(n_vision, n_text, batch)  # validate before inferring images from n_vision
    per = config.vision.num_patches
    if include_vision and n_images is None:
        if config.image_aspect_ratio == "anyres" or any(v % per for v in _flat(n_vision)):
            raise ValueError(f"pass n_images (S×S images through the tower per sample): it cannot be inferred from "
                             f"n_vision={n_vision!r} with image_aspect_ratio={config.image_aspect_ratio!r}")
        n_images = n_vision // per if isinstance(n_vision, int) else [v // per for v in n_vision]
    samples = _samples(n_vision, n_text, batch, n_images if include_vision else 0)
    opts = (convention, decode_steps, last_only, vision_layers)
    dense = _count(config.replace(mod={"schedule": "none"}), samples, *opts)
    if config.is_dense:
        return dense
    return FlopReport(**{**_count(config, samples, *opts).__dict__, "dense": dense})


def _flat(x: Counts) -> list[int]:
    return [x] if isinstance(x, int) else list(x)


def _count(config: PmodConfig, samples: list[tuple[int, int, int]], convention: str, steps: int, last_only: bool,
           vision_layers: int | None) -> FlopReport:
    t, mod, complete = config.text, config.mod_ratios, convention == "complete"
    L, macs, lm = t.num_hidden_layers, layer_linear_macs(t), linear_flops(1, t.hidden_size, t.vocab_size)
    acc = {"per_layer": [0] * L, "tokens_per_layer": [0] * L, "kv_len_per_layer": [0] * L}
    decoder = lm_head = decode = 0
    for v, n_t, _ in samples:
        toks = tokens_per_layer(config, v, n_t)
        router = [v if complete and i in mod else 0 for i in range(L)]
        layers = decoder_flops_from_tokens(config, toks, router_tokens=router, attention=complete)
        # decode step j (1..s): 1 token per layer against c_l + j keys; Σ_j (c_l + j) = s·c_l + s(s+1)/2
        dec = [2 * steps * macs + 4 * t.num_attention_heads * t.head_dim * (steps * c + steps * (steps + 1) // 2)
               for c in toks]
        for key, vals in (("per_layer", [a + b for a, b in zip(layers, dec)]), ("tokens_per_layer", toks),
                          ("kv_len_per_layer", [c + steps for c in toks])):
            acc[key] = [a + b for a, b in zip(acc[key], vals)]
        decoder += sum(layers) + sum(dec)
        lm_head += lm * ((1 if last_only else v + n_t) + steps)
        decode += sum(dec) + lm * steps
    images = sum(i for _, _, i in samples)  # 0 unless include_vision
    vision = vision_flops(config.vision, images, layers=vision_layers) if images else 0
    projector = projector_flops(config, images * config.vision.num_patches) if images else 0
    return FlopReport(convention, decoder=decoder, lm_head=lm_head, vision=vision, projector=projector,
                      decode=decode, batch=len(samples), **acc)


@dataclass(frozen=True)
class KVReport:
    """KV-cache bytes per layer (2·g·e·c_l·bytes, summed over the batch) for p-MoD and its dense twin.

    `ratio` follows `convention`: 'paper' = vision-token entries averaged over layers with fractional
    ratios, (L - |MoD| + Σ r_l) / L, text not counted (53.75 % at the default 32-layer schedule, the
    paper's 53.8 %); 'paper_int' = the same with integer k_l, Σ_l k_l / (L·n_vision) (53.69 % at 576
    tokens, the paper's v2 53.7 %); 'complete' = total bytes / dense bytes, text included."""

    convention: str
    per_layer: list[int]
    dense_per_layer: list[int]
    vision_fraction: float
    vision_fraction_int: float

    @property
    def total(self) -> int:
        return sum(self.per_layer)

    @property
    def dense_total(self) -> int:
        return sum(self.dense_per_layer)

    @property
    def ratio(self) -> float:
        return {"paper": self.vision_fraction, "paper_int": self.vision_fraction_int,
                "complete": self.total / self.dense_total}[self.convention]


def kv_cache_bytes(
    config: PmodConfig, n_vision: Counts, n_text: Counts, dtype: torch.dtype | int = torch.float16,
    convention: str = "paper", *, decode_steps: int = 0, batch: int = 1,
) -> KVReport:
    """KV cache held after prefill (+ decode steps): a dense layer keeps n + s entries, a MoD layer
    n_text + k_l + s. `dtype` is a torch dtype or bytes per element."""
    if convention not in KV_CONVENTIONS:
        raise ValueError(f"unknown KV convention {convention!r}; expected one of {KV_CONVENTIONS}")
    if decode_steps < 0:
        raise ValueError(f"decode_steps must be >= 0, got {decode_steps}")
    size = dtype if isinstance(dtype, int) else dtype.itemsize
    t, L, mod = config.text, config.text.num_hidden_layers, config.mod_ratios
    samples = _samples(n_vision, n_text, batch)
    per_entry = 2 * t.num_key_value_heads * t.head_dim * size
    per, dense, kept = [0] * L, [0] * L, 0
    for v, n_t, _ in samples:
        toks = tokens_per_layer(config, v, n_t)
        per = [a + per_entry * (c + decode_steps) for a, c in zip(per, toks)]
        dense = [a + per_entry * (v + n_t + decode_steps) for a in dense]
        kept += sum(c - n_t for c in toks)
    vis = sum(v for v, _, _ in samples)
    frac = (L - len(mod) + sum(mod.values())) / L if vis else 1.0
    return KVReport(convention, per, dense, frac, kept / (L * vis) if vis else 1.0)


def format_table(report: FlopReport, dense_report: FlopReport | None = None) -> str:
    """A markdown table of FLOPs by part, p-MoD against dense (default `report.dense`), naming the convention; one
    unit for the table, the one that shows the dense total as at least 1 (TFLOPs at 7B shapes, GFLOPs when tiny)."""
    dense = dense_report or report.dense or report
    rows = [("vision tower", "vision"), ("projector", "projector"), ("decoder layers", "decoder"),
            ("lm_head", "lm_head"), ("decode steps (within the above)", "decode"), ("total", "total")]
    unit, scale = flops_unit(dense.total)
    lines = [f"FLOPs, convention {CONVENTIONS[report.convention]}, batch {report.batch}", "",
             f"| part | p-MoD {unit} | dense {unit} | ratio |", "|---|---:|---:|---:|"]
    skipped = [name for name, key in rows if key != "total" and not getattr(report, key) and not getattr(dense, key)]
    for name, key in rows:
        a, b = getattr(report, key), getattr(dense, key)
        if name not in skipped:
            lines.append(f"| {name} | {a / scale:.4f} | {b / scale:.4f} | {f'{100 * a / b:.1f} %' if b else '-'} |")
    if skipped:
        lines += ["", "not counted: " + ", ".join(n.removesuffix(" (within the above)") for n in skipped)]
    return "\n".join(lines)
