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

The token counts priced here are `pmod.token_counts`'; KV bytes are `pmod.kv_bytes`'. Both are re-exported.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from pmod.config import PmodConfig, TextConfig, VisionConfig
from pmod.kv_bytes import KV_CONVENTIONS, KVReport, kv_cache_bytes  # re-exported: one import for both accounts
from pmod.reduction.spec import ReductionSpec, visionzip_split
from pmod.token_counts import NATIVE_DEFAULT_SIZE, Counts, flat, image_tokens, samples, scoring_flops, tokens_per_layer

__all__ = [
    "CONVENTIONS", "KV_CONVENTIONS", "FlopReport", "KVReport", "linear_flops", "attention_flops",
    "layer_linear_macs", "tokens_per_layer", "scoring_flops", "decoder_flops_from_tokens", "vision_flops", "projector_flops",
    "count_flops", "kv_cache_bytes", "format_table", "format_flops", "flops_unit", "image_tokens", "NATIVE_DEFAULT_SIZE",
]

CONVENTIONS = {
    "paper": "paper: prefill, LLM linears + lm_head, no attention scores",
    "complete": "complete: all matmuls incl. attention scores (full rectangle), router",
}
# transformers.CLIPVisionConfig defaults, for keys a VisionConfig.clip dict leaves out
_CLIP = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_channels=3, image_size=224,
             patch_size=32)
_UNITS = (("TFLOPs", 1e12), ("GFLOPs", 1e9))


def flops_unit(x: float) -> tuple[str, float]:
    """(name, scale): TFLOPs from 1e12 on (7B shapes), GFLOPs below (a tiny model shows 0.81 GFLOPs, not 0.00)."""
    return next(((n, s) for n, s in _UNITS if abs(x) >= s), _UNITS[-1])


def format_flops(x: float, unit: str | None = None, digits: int = 2) -> str:
    """'8.38 TFLOPs', '812.45 GFLOPs': `x` FLOPs in `unit` (default: `flops_unit(x)`)."""
    name, scale = flops_unit(x) if unit is None else next((n, s) for n, s in _UNITS if n == unit)
    return f"{x / scale:.{digits}f} {name}"


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
    n_images: Counts | None = None, vision_layers: int | None = None, reduction: ReductionSpec | None = None,
) -> FlopReport:
    """FLOPs of a forward (see the module docstring for both conventions), with the dense twin in `.dense`.

    n_vision, n_text: per sample, an int (repeated `batch` times) or a list. n_images: S×S images through
    the tower per sample; by default n_vision / (tokens per image), which anyres layouts must pass
    explicitly (1 + crops). Only `complete` takes include_vision, decode_steps and last_only. `reduction`: a
    training-free method (`pmod.reduction`) on top of the config's layers; n_vision is then what the unreduced
    model sees, and `complete` adds the method's scoring (`scoring_flops`)."""
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown convention {convention!r}; expected one of {tuple(CONVENTIONS)}")
    if convention == "paper" and (include_vision or decode_steps or last_only):
        raise ValueError("convention 'paper' counts the LLM prefill over all positions only; use 'complete' for "
                         "include_vision, decode_steps or last_only")
    if decode_steps < 0:
        raise ValueError(f"decode_steps must be >= 0, got {decode_steps}")
    samples(n_vision, n_text, batch)  # validate before inferring images from n_vision
    per = config.vision.num_patches
    if include_vision and n_images is None:
        if config.image_aspect_ratio == "anyres" or any(v % per for v in flat(n_vision)):
            raise ValueError(f"pass n_images (S×S images through the tower per sample): it cannot be inferred from "
                             f"n_vision={n_vision!r} with image_aspect_ratio={config.image_aspect_ratio!r}")
        n_images = n_vision // per if isinstance(n_vision, int) else [v // per for v in n_vision]
    rows = samples(n_vision, n_text, batch, n_images if include_vision else 0)
    opts = (convention, decode_steps, last_only, vision_layers)
    dense = _count(config.replace(mod={"schedule": "none"}), rows, *opts)
    if config.is_dense and reduction is None:
        return dense
    return FlopReport(**{**_count(config, rows, *opts, reduction).__dict__, "dense": dense})


def _count(config: PmodConfig, rows: list[tuple[int, int, int]], convention: str, steps: int, last_only: bool,
           vision_layers: int | None, reduction: ReductionSpec | None = None) -> FlopReport:
    t, mod, complete = config.text, config.mod_ratios, convention == "complete"
    L, macs, lm = t.num_hidden_layers, layer_linear_macs(t), linear_flops(1, t.hidden_size, t.vocab_size)
    acc = {"per_layer": [0] * L, "tokens_per_layer": [0] * L, "kv_len_per_layer": [0] * L}
    decoder = lm_head = decode = 0
    zip_per = sum(visionzip_split(config.vision.num_patches, reduction.keep)) if reduction and reduction.method == "visionzip" else None
    for v, n_t, _ in rows:
        toks = tokens_per_layer(config, v, n_t, reduction)
        vis = reduction.vision_per_layer(L, v, config.vision.num_patches) if reduction else [v] * L  # before routing
        router = [vis[i] if complete and i in mod else 0 for i in range(L)]
        layers = decoder_flops_from_tokens(config, toks, router_tokens=router, attention=complete)
        if complete:
            layers = [a + b for a, b in zip(layers, scoring_flops(config, reduction, v, n_t))]
        v = v if zip_per is None else v // config.vision.num_patches * zip_per  # the sequence VisionZip leaves
        # decode step j (1..s): 1 token per layer against c_l + j keys; Σ_j (c_l + j) = s·c_l + s(s+1)/2
        dec = [2 * steps * macs + 4 * t.num_attention_heads * t.head_dim * (steps * c + steps * (steps + 1) // 2)
               for c in toks]
        for key, vals in (("per_layer", [a + b for a, b in zip(layers, dec)]), ("tokens_per_layer", toks),
                          ("kv_len_per_layer", [c + steps for c in toks])):
            acc[key] = [a + b for a, b in zip(acc[key], vals)]
        decoder += sum(layers) + sum(dec)
        lm_head += lm * ((1 if last_only else v + n_t) + steps)
        decode += sum(dec) + lm * steps
    images = sum(i for _, _, i in rows)  # 0 unless include_vision
    vision = vision_flops(config.vision, images, layers=vision_layers) if images else 0
    projector = projector_flops(config, images * (zip_per or config.vision.num_patches)) if images else 0
    return FlopReport(convention, decoder=decoder, lm_head=lm_head, vision=vision, projector=projector,
                      decode=decode, batch=len(rows), **acc)


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
