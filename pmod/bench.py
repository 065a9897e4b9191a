"""`pmod bench`: dense vs p-MoD on the same weights, in one run, against transformers where it has a twin.

    pmod bench [--preset cpu|gpu-7b|tiny] [--device cpu|cuda] [--output DIR] [--quick] [--threads N]
    python -m pmod.bench ...                       (the same, without the console script)

What is measured (every ratio is computed inside the run, from repetitions interleaved across the compared
models so that drift hits them alike; median and min over `reps` after `warmup` runs; fixed seeds;
`torch.inference_mode`; on CUDA each call is bracketed by CUDA events after a synchronize):

* prefill: generation's prefill, `model(ids, images, use_cache=True, logits_to_keep='last')` (vision tower,
  projector, layout, decoder writing the KV cache, lm_head on the last token) for the dense model and p-MoD
  models with the same weights, at LLaVA-1.5 (1 image, 576 tokens) and LLaVA-NeXT (5 images, 2880 tokens)
  counts; ideal speed-up = dense FLOPs / p-MoD FLOPs (`pmod.flops`, complete convention, vision stand-in and
  projector included, lm_head on the last token). The vision tower is a 2-layer 64-wide CLIP stand-in at
  336 px / 14 (576 tokens per image), counted in the FLOPs, so the LLM dominates as in LLaVA.
* decode: `steps` greedy `decode_step`s at batch 1 and 8 over a prefilled cache (eos plays no part);
  tokens/s = B * steps / time; the batch-8 cache is 8 copies of one prefilled row (decode cost depends on
  lengths only). KV bytes are read from the cache (`PmodCache.nbytes`), text included and vision only.
* against transformers: our decoder vs `LlamaModel` prefill (same inputs_embeds, SDPA); our
  `pmod.generate.generate` vs `LlamaForCausalLM.generate(min_new_tokens=n)` at batch 1, per decode step as
  (stamp of the n-th new token - stamp of the 1st) / (n - 1), stamped by a streamer, so each side's own
  prefill is excluded (a 634-token text prompt: LLaVA-1.5's length).
* batching: 8 text prompts of unequal length generated as one batch vs one by one (tokens compared).
* packing: a batch with unequal image counts through our packed decoder vs padded execution of the same
  weights: our decoder on rows filled to equal length (exact on real tokens: right fill under a causal mask)
  and `LlamaModel` over right-padded inputs_embeds with an attention mask.

p-MoD models are the dense model's modules plus routers ~ N(0, router_std) (bias 0), so routing is
non-trivial (checked: kept tokens are not the first k). Weights are random (LLaMA init, std 0.02), built
on the target device; nothing is downloaded. Outputs in --output: results.json, results.md, speedup.png;
the last stdout line is one JSON object. Peak memory: CUDA max_memory_allocated above the pre-call
allocation; CPU peak RSS growth (VmHWM reset through /proc/self/clear_refs), a lower bound because the
allocator reuses memory it already holds. CPU timings are only as clean as the machine is idle: the run records
the load average and, per section, the share of CPU time other processes took (with 2 threads, a busy machine
stalls every parallel op; prefer --threads 1 there and read the ratios, not the absolute times).
Legend: B rows, L layers, P tokens per image, n_v vision tokens per row, n_t text tokens per row.
"""
from __future__ import annotations

import copy
import dataclasses
import datetime
import gc
import json
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pmod.attention import resolve_backend
from pmod.cache import PmodCache
from pmod.config import ModConfig, PmodConfig, TextConfig, VisionConfig
from pmod.flops import attention_flops, count_flops
from pmod.generate import generate
from pmod.modeling.block import AttnContext
from pmod.modeling.llava import PmodForConditionalGeneration
from pmod.modeling.vision import build_vision_tower
from pmod.packing import IMAGE_TOKEN_INDEX

__all__ = [
    "Preset", "PRESETS", "Prompt", "Timing", "build_dense", "with_routers", "hf_llama", "make_prompt", "prefill",
    "decode_loop", "replicate_rows", "time_interleaved", "bench_prefill", "bench_decode", "bench_hf_prefill",
    "bench_hf_decode", "StepClock", "bench_batching", "bench_packing", "evaluate_checks", "write_markdown",
    "plot_speedup",
    "machine_info", "run_benchmark", "add_parser", "run", "main",
]

SECTIONS = ("prefill", "decode", "hf_prefill", "hf_decode", "batching", "packing")
STAND_IN_CLIP = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                     image_size=336, patch_size=14, hidden_act="quick_gelu")


# ---------------------------------------------------------------------------------------------- presets
@dataclass(frozen=True)
class Preset:
    """Shapes and repetitions of one benchmark run. `images`: images per prompt (x P vision tokens each)."""

    name: str
    text: dict
    dtype: torch.dtype
    clip: dict = field(default_factory=lambda: dict(STAND_IN_CLIP))
    n_text: int = 58
    images: tuple[int, ...] = (1, 5)  # 576 (LLaVA-1.5) and 2880 (LLaVA-NeXT) vision tokens at P = 576
    sweep: tuple[float, ...] = (0.25, 0.5, 0.75)  # deep_all constant ratios, besides the default PRD
    sweep_images: tuple[int, ...] = (1, 5)  # prompts at which the sweep runs (PRD runs at all)
    decode_batches: tuple[int, ...] = (1, 8)
    decode_steps: int = 16
    hf_new_tokens: int = 33
    batch_prompts: int = 8
    batch_text: tuple[int, int] = (20, 69)  # shortest and longest prompt of the batching test
    batch_new_tokens: int = 16
    packed_images: tuple[int, ...] = (0, 1, 2)
    router_std: float = 0.02
    warmup: int = 1
    reps: int = 3
    quick: dict = field(default_factory=dict)  # overrides applied by --quick

    def config(self, mod: ModConfig | None = None) -> PmodConfig:
        """The model config: our decoder shape, the CLIP stand-in, `mod` (default: dense)."""
        return PmodConfig(text=TextConfig(**self.text), vision=VisionConfig(clip=dict(self.clip)),
                          mod=mod or ModConfig(schedule="none"), model_max_length=self.text["max_position_embeddings"])


_LLAMA = dict(vocab_size=32000, num_hidden_layers=32, rms_norm_eps=1e-5, max_position_embeddings=4096)
PRESETS: dict[str, Preset] = {
    "cpu": Preset(
        "cpu", dict(_LLAMA, hidden_size=512, intermediate_size=1376, num_attention_heads=8), torch.float32,
        warmup=1, reps=5,  # a shared 2-vCPU VM drifts by ~5 % between runs: 5 interleaved rounds, medians
        quick=dict(reps=2, sweep=(0.25,), sweep_images=(1,), decode_steps=8, hf_new_tokens=17, batch_new_tokens=8),
    ),
    "gpu-7b": Preset(
        "gpu-7b", dict(_LLAMA, hidden_size=4096, intermediate_size=11008, num_attention_heads=32), torch.bfloat16,
        decode_steps=64, hf_new_tokens=65, batch_new_tokens=32, warmup=2, reps=5,
        quick=dict(reps=3, sweep=(0.25,), decode_steps=16, hf_new_tokens=17),
    ),
    "tiny": Preset(  # the smoke test's shape: seconds, bookkeeping only
        "tiny", dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=512), torch.float32,
        clip=dict(STAND_IN_CLIP, image_size=42), n_text=10, images=(1, 3), sweep=(0.5,), sweep_images=(1,),
        decode_batches=(1, 3), decode_steps=3, hf_new_tokens=4, batch_prompts=3, batch_text=(4, 9),
        batch_new_tokens=3, packed_images=(0, 1, 2), router_std=0.5, warmup=0, reps=1,
    ),
}


def schedules(preset: Preset) -> dict[str, ModConfig]:
    """The p-MoD variants: the default PRD (shifted cosine) and `deep_all` at each constant sweep ratio."""
    out = {"prd": ModConfig()}
    out.update({f"deep_all@{r:g}": ModConfig(schedule="deep_all", avg_ratio=r) for r in preset.sweep})
    return out


# ---------------------------------------------------------------------------------------------- models
def build_dense(preset: Preset, device: str, seed: int = 0, attn_backend: str = "auto") -> PmodForConditionalGeneration:
    """Dense model with random weights built on `device` (decoder on meta first: no full-size CPU copy)."""
    cfg = preset.config()
    with torch.device("meta"):
        model = PmodForConditionalGeneration(cfg, attn_backend=attn_backend)
    model = model.to(preset.dtype).to_empty(device=device)
    torch.manual_seed(seed)
    with torch.device(device):  # the small tower gets transformers' init and real buffers (position ids)
        model.vision_tower = build_vision_tower(cfg.vision).to(preset.dtype)
    return model.init_weights().eval().requires_grad_(False)


def with_routers(dense: PmodForConditionalGeneration, mod: ModConfig, router_std: float, seed: int = 0):
    """A p-MoD model sharing every module of `dense` (no copy), plus routers ~ N(0, router_std), bias 0."""
    cfg = dense.config.replace(mod=mod)
    with torch.device("meta"):
        model = PmodForConditionalGeneration(cfg, attn_backend=dense.attn_backend)
    for name in ("vision_tower", "projector", "lm_head", "image_newline"):
        if hasattr(dense, name):
            setattr(model, name, getattr(dense, name))
    lm, src = model.language_model, dense.language_model
    lm.embed_tokens, lm.layers, lm.norm = src.embed_tokens, src.layers, src.norm
    g = torch.Generator(dense.device).manual_seed(seed)
    C = cfg.text.hidden_size
    routers = {}
    for key in lm.routers:
        r = nn.Linear(C, 1, bias=cfg.mod.router_bias, device=dense.device, dtype=dense.dtype)
        with torch.no_grad():
            r.weight.normal_(0.0, router_std, generator=g)
            if r.bias is not None:
                r.bias.zero_()
        routers[key] = r
    lm.routers = nn.ModuleDict(routers)
    return model.eval().requires_grad_(False)


def hf_llama(dense: PmodForConditionalGeneration):
    """`transformers.LlamaForCausalLM` (SDPA) whose parameters ARE our tensors (`language_model.*` -> `model.*`)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    t = dense.config.text
    cfg = LlamaConfig(
        vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads, head_dim=t.head_dim, rms_norm_eps=t.rms_norm_eps,
        rope_theta=t.rope_theta, max_position_embeddings=t.max_position_embeddings, tie_word_embeddings=False,
        bos_token_id=t.bos_token_id, eos_token_id=t.eos_token_id, pad_token_id=t.pad_token_id,
        attn_implementation="sdpa",
    )
    with torch.device("meta"):
        hf = LlamaForCausalLM(cfg)
    sd = {k.replace("language_model.", "model.", 1): v for k, v in dense.state_dict(keep_vars=True).items()
          if k.startswith("language_model.") and ".routers." not in k}
    sd["lm_head.weight"] = dense.lm_head.weight
    missing, unexpected = hf.load_state_dict(sd, strict=False, assign=True)
    if unexpected or any("rotary" not in k for k in missing):
        raise RuntimeError(f"hf_llama: key map mismatch: missing {missing}, unexpected {unexpected}")
    hf.model.rotary_emb = LlamaRotaryEmbedding(config=cfg).to(dense.device)
    return hf.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------- inputs
@dataclass
class Prompt:
    """A batch: input_ids [B, T] (IMAGE_TOKEN_INDEX where images go), mask [B, T] or None, pixels [I, 3, S, S]."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    images: torch.Tensor | None
    n_vision: list[int]
    n_text: list[int]
    n_images: list[int]

    @property
    def merged_lens(self) -> list[int]:
        return [v + t for v, t in zip(self.n_vision, self.n_text)]


def make_prompt(config: PmodConfig, images: Sequence[int], n_text: int | Sequence[int], device: str, seed: int = 0,
                fill: bool = False) -> Prompt:
    """Rows of [BOS, text, <image> x images[b], text] with random ids, right-padded with a mask; `fill=True`
    instead appends random text so that every row has the same merged length (no mask: padded execution)."""
    g = torch.Generator().manual_seed(seed)
    n_text = [n_text] * len(images) if isinstance(n_text, int) else list(n_text)
    P, V = config.vision.num_patches, config.text.vocab_size
    rand = lambda n: torch.randint(3, V, (n,), generator=g).tolist()
    rows = [[1] + rand((t - 1) // 2) + [IMAGE_TOKEN_INDEX] * k + rand(t - 1 - (t - 1) // 2)
            for k, t in zip(images, n_text)]
    merged = [t + k * P for k, t in zip(images, n_text)]
    S = config.vision.image_size
    pixels = torch.randn(sum(images), 3, S, S, generator=g).to(device) if sum(images) else None
    if fill:  # drawn after the pixels, so a filled prompt holds the same rows and images as the plain one
        rows = [r + rand(max(merged) - m) for r, m in zip(rows, merged)]
        n_text = [t + max(merged) - m for t, m in zip(n_text, merged)]
    T = max(map(len, rows))
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, : len(r)], mask[b, : len(r)] = torch.tensor(r), 1
    return Prompt(ids, None if bool(mask.all()) else mask, pixels, [k * P for k in images], n_text, list(images))


# ---------------------------------------------------------------------------------------------- the measured calls
def prefill(model, prompt: Prompt, reserve: int = 0):
    """Generation's prefill (as `pmod.generate.generate` runs it): PmodOutput with the cache, last logits [B, V]."""
    return model(input_ids=prompt.input_ids, images=prompt.images, attention_mask=prompt.attention_mask,
                 use_cache=True, cache_reserve=reserve, logits_to_keep="last", output_routing=False)


def decode_loop(model, cache: PmodCache, logits: torch.Tensor, steps: int) -> torch.Tensor:
    """`steps` greedy decode steps from last logits [B, V]; no host sync. Returns the last tokens [B]."""
    tok = logits.argmax(-1)
    for _ in range(steps):
        tok = model.decode_step(tok, cache).argmax(-1)
    return tok


def replicate_rows(cache: PmodCache, batch: int) -> PmodCache:
    """A new cache holding `batch` copies of row 0 of `cache` (which is left untouched)."""
    c = copy.copy(cache)
    c.k, c.v, c.seqlens = list(cache.k), list(cache.v), list(cache.seqlens)
    c.lengths = [list(x) for x in cache.lengths]
    c.select_rows(torch.zeros(batch, dtype=torch.long))
    return c


def _snapshot(cache: PmodCache) -> tuple:
    return [list(x) for x in cache.lengths], list(cache.seqlens), cache.positions


def _rewind(cache: PmodCache, snap: tuple) -> None:
    """Back to the prefill state: later slots are beyond every length, so they are never read."""
    cache.lengths, cache.seqlens, cache.positions = [list(x) for x in snap[0]], list(snap[1]), snap[2]


def _decoder(model, x: torch.Tensor, layout) -> torch.Tensor:
    """Our decoder alone over packed x [N, C], no cache; route plans rebuilt as a fresh prefill would."""
    layout = dataclasses.replace(layout, _plans={})
    ctx = AttnContext(resolve_backend(model.attn_backend, model.device), layout.varlen, None)
    return model.language_model(x, layout, ctx, record=False)[0]


# ---------------------------------------------------------------------------------------------- timing
@dataclass
class Timing:
    """Wall times of one callable in ms and its peak memory above the pre-call level (bytes, max over reps)."""

    times_ms: list[float] = field(default_factory=list)
    peak_bytes: int | None = None
    result: Any = None  # the last repetition's return value

    @property
    def median_ms(self) -> float:
        return _median(self.times_ms)

    @property
    def min_ms(self) -> float:
        return min(self.times_ms)

    def summary(self) -> dict:
        return {"median_ms": self.median_ms, "min_ms": self.min_ms, "times_ms": self.times_ms,
                "peak_bytes": self.peak_bytes}


def _median(xs: Sequence[float]) -> float:
    s = sorted(xs)
    return (s[(len(s) - 1) // 2] + s[len(s) // 2]) / 2


def _mem_start(device: str) -> int | None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM, the peak resident set size
        return _status_kib("VmRSS")
    except OSError:
        return None


def _mem_peak(device: str, base: int | None) -> int | None:
    if base is None:
        return None
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() - base
    return _status_kib("VmHWM") - base


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return 1024 * int(re.search(rf"{key}:\s+(\d+)", f.read()).group(1))


def _time_once(fn: Callable[[], Any], device: str) -> tuple[float, Any]:
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        out = fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end), out
    t0 = time.perf_counter()
    out = fn()
    return (time.perf_counter() - t0) * 1e3, out


def time_interleaved(fns: dict[str, Callable[[], Any]], device: str, warmup: int, reps: int) -> dict[str, Timing]:
    """Time every callable `reps` times, interleaved (a, b, c, a, b, c, ...), after `warmup` rounds.

    The garbage collector runs once before and is off while timing (as in `timeit`); the previous result of a
    callable is dropped before its next call."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    out = {name: Timing() for name in fns}
    gc.collect()
    gc.disable()
    try:
        for _ in range(reps):
            for name, fn in fns.items():
                out[name].result = None
                base = _mem_start(device)
                ms, res = _time_once(fn, device)
                peak = _mem_peak(device, base)
                out[name].times_ms.append(ms)
                out[name].result = res
                if peak is not None:
                    out[name].peak_bytes = max(peak, out[name].peak_bytes or 0)
    finally:
        gc.enable()
    return out


# ---------------------------------------------------------------------------------------------- sections
def _flops(config: PmodConfig, prompt: Prompt):
    return count_flops(config, n_vision=prompt.n_vision, n_text=prompt.n_text, convention="complete",
                       include_vision=True, n_images=prompt.n_images, last_only=True)


def _causal_total(report, config: PmodConfig) -> int:
    """`report.total` with the decoder's attention counted over causal pairs only (the work a causal kernel does)
    instead of the full n x n rectangle of the complete convention (one sample)."""
    h, e = config.text.num_attention_heads, config.text.head_dim
    return report.total + sum(attention_flops(n, n, h, e, causal=True) - attention_flops(n, n, h, e)
                              for n in report.tokens_per_layer)


def _routing_nontrivial(model, prompt: Prompt) -> bool:
    """True when some MoD layer keeps vision tokens other than the first k of a row."""
    out = model(input_ids=prompt.input_ids, images=prompt.images, attention_mask=prompt.attention_mask)
    mask = out.vision_mask[0]
    first = torch.nonzero(mask).squeeze(1)
    for rec in out.routing:
        k = rec.num_kept[0]
        if not torch.equal(rec.kept[0, :k].cpu(), first[:k].cpu()):
            return True
    return False


def bench_prefill(dense, variants: dict, preset: Preset, device: str, warmup: int, reps: int) -> list[dict]:
    """Prefill latency and throughput of dense and each p-MoD variant, interleaved, at each prompt size."""
    rows = []
    for k in preset.images:
        prompt = make_prompt(dense.config, [k], preset.n_text, device, seed=k)
        models = {"dense": dense, **{n: m for n, m in variants.items() if n == "prd" or k in preset.sweep_images}}
        timings = time_interleaved({n: partial(prefill, m, prompt) for n, m in models.items()}, device, warmup, reps)
        base = timings["dense"]
        for name, m in models.items():
            t, rep = timings[name], _flops(m.config, prompt)
            cache = t.result.past_key_values
            n_v, n_t = prompt.n_vision[0], prompt.n_text[0]
            ideal = rep.dense_total / rep.total
            dense_rep = rep.dense or rep
            rows.append({
                "n_vision": n_v, "n_text": n_t, "model": name, "schedule": _schedule_name(m.config),
                "kept_ratio": sum(n - n_t for n in rep.tokens_per_layer) / (len(rep.tokens_per_layer) * n_v),
                "tflops": rep.total / 1e12, "tflops_dense": rep.dense_total / 1e12, "ideal_speedup": ideal,
                "ideal_speedup_causal": _causal_total(dense_rep, dense.config) / _causal_total(rep, m.config),
                **t.summary(), "tokens_per_s": (n_v + n_t) / (t.median_ms / 1e3),
                "speedup_median": base.median_ms / t.median_ms, "speedup_min": base.min_ms / t.min_ms,
                "speedup_paired": _median([a / b for a, b in zip(base.times_ms, t.times_ms)]),
                "fraction_of_ideal": base.median_ms / t.median_ms / ideal,
                "kv_bytes": cache.nbytes(), "kv_lengths_match_flops": cache.layer_lengths() == rep.tokens_per_layer,
            })
            t.result = None
    return rows


def _schedule_name(config: PmodConfig) -> str:
    m = config.mod
    return "dense" if config.is_dense else (m.schedule if m.schedule != "deep_all" else f"deep_all avg {m.avg_ratio:g}")


def bench_decode(dense, pmod, preset: Preset, device: str, warmup: int, reps: int) -> list[dict]:
    """Decode tokens/s at each batch size over a prefilled prompt of each size; KV bytes from the cache."""
    rows, steps = [], preset.decode_steps
    for k in preset.images:
        prompt = make_prompt(dense.config, [k], preset.n_text, device, seed=k)
        first = {n: prefill(m, prompt, reserve=steps) for n, m in (("dense", dense), ("prd", pmod))}
        for B in preset.decode_batches:
            caches = {n: o.past_key_values if B == 1 else replicate_rows(o.past_key_values, B)
                      for n, o in first.items()}
            logits = {n: o.logits.expand(B, -1) for n, o in first.items()}
            snaps = {n: _snapshot(c) for n, c in caches.items()}
            models = {"dense": dense, "prd": pmod}
            fns = {n: partial(_decode_from, m, caches[n], snaps[n], logits[n], steps) for n, m in models.items()}
            timings = time_interleaved(fns, device, warmup, reps)
            for n in models:
                _rewind(caches[n], snaps[n])
                rows.append(_decode_row(n, caches[n], timings[n], B, steps, prompt, caches["dense"].nbytes()))
            del caches, snaps
    return rows


def _decode_from(model, cache: PmodCache, snap: tuple, logits: torch.Tensor, steps: int) -> torch.Tensor:
    """Rewind the cache to its prefill state, then decode `steps` tokens (the timed call of `bench_decode`)."""
    _rewind(cache, snap)
    return decode_loop(model, cache, logits, steps)


def _decode_row(name, cache: PmodCache, t: Timing, B: int, steps: int, prompt: Prompt, dense_kv: int) -> dict:
    kv, L = cache.nbytes(), cache.num_layers
    text_kv = cache.token_nbytes(next(i for i, k in enumerate(cache.k) if k is not None)) * prompt.n_text[0] * L * B  # text, every layer
    return {
        "n_vision": prompt.n_vision[0], "n_text": prompt.n_text[0], "model": name, "batch": B, "steps": steps,
        **t.summary(), "tokens_per_s": B * steps / (t.median_ms / 1e3), "ms_per_step": t.median_ms / steps,
        "kv_bytes": kv, "kv_ratio": kv / dense_kv, "kv_vision_ratio": (kv - text_kv) / (dense_kv - text_kv),
        "kv_allocated_bytes": cache.allocated_nbytes(),
    }


def _hf_hidden(hf, embeds: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """`LlamaModel` over embeds [B, T, C] (mask [B, T] or None), no cache: last hidden states (B = 1: [T, C])."""
    h = hf.model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state
    return h[0] if h.shape[0] == 1 and mask is None else h


def bench_hf_prefill(dense, hf, preset: Preset, device: str, warmup: int, reps: int) -> list[dict]:
    """Our decoder vs `transformers.LlamaModel` on the same inputs_embeds (batch 1, no cache), with parity."""
    rows = []
    for k in preset.images:
        prompt = make_prompt(dense.config, [k], preset.n_text, device, seed=k)
        x, layout = dense.prepare(prompt.input_ids, prompt.images)
        fns = {"ours": partial(_decoder, dense, x, layout), "hf": partial(_hf_hidden, hf, x[None], None)}
        t = time_interleaved(fns, device, warmup, reps)
        rows.append({
            "n_tokens": x.shape[0], "ours": t["ours"].summary(), "hf": t["hf"].summary(),
            "ratio_median": t["ours"].median_ms / t["hf"].median_ms, "ratio_min": t["ours"].min_ms / t["hf"].min_ms,
            "max_abs_diff": (t["ours"].result.float() - t["hf"].result.float()).abs().max().item(),
        })
    return rows


class StepClock:
    """A generate streamer that timestamps every new token: HF's `put` (whose first call is the prompt) and
    pmod's callable form. On CUDA it synchronises first, so a stamp marks a token that exists."""

    def __init__(self, device: str, skip_first: bool):
        self.cuda, self.skip, self.stamps = device.startswith("cuda"), skip_first, []

    def put(self, value) -> None:
        if self.skip:
            self.skip = False
            return
        if self.cuda:
            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())

    __call__ = put

    def end(self) -> None:
        pass

    @property
    def step_ms(self) -> float:
        """Mean ms between the first and the last new token: one decode step each, prefill excluded."""
        return (self.stamps[-1] - self.stamps[0]) * 1e3 / (len(self.stamps) - 1)


def floor_step(model, cache: PmodCache) -> Callable[[], torch.Tensor]:
    """The work no batch-1 decode step can skip: every weight matrix times one token (GEMV) and attention over
    each layer's cache, back to back, with no norms, RoPE, residuals, cache writes or sampling. At small
    shapes a step is bound by reading the weights and the cache from memory; this is that floor, and the time
    above it is an implementation's own overhead."""
    lm, C = model.language_model, model.config.text.hidden_size
    x = torch.randn(1, C, device=model.device, dtype=model.dtype)
    kv = [cache.layer_kv(i) for i in range(cache.num_layers)]  # [1, S, G, D] views

    def step() -> torch.Tensor:
        for layer, (k, v) in zip(lm.layers, kv):
            a, m = layer.self_attn, layer.mlp
            q = F.linear(x, a.q_proj.weight).view(1, a.H, 1, a.D)
            F.linear(x, a.k_proj.weight), F.linear(x, a.v_proj.weight)
            o = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2), enable_gqa=a.H != a.G)
            F.linear(o.reshape(1, -1), a.o_proj.weight)
            hid = F.linear(x, m.gate_proj.weight) * F.linear(x, m.up_proj.weight)
            F.linear(hid, m.down_proj.weight)
        return F.linear(x, model.lm_head.weight)

    return step


def bench_hf_decode(dense, hf, preset: Preset, device: str, warmup: int, reps: int) -> dict:
    """Per decode step at batch 1, `pmod.generate.generate` vs HF `generate(min_new_tokens=n)`: the time between
    the first and the n-th new token over n - 1, stamped by a streamer, so each side's own prefill is excluded."""
    n = preset.hf_new_tokens
    L = preset.n_text + preset.images[0] * dense.config.vision.num_patches  # a text prompt as long as LLaVA-1.5's
    ids = make_prompt(dense.config, [0], L, "cpu", seed=7).input_ids
    ids_dev, pad = ids.to(dense.device), dense.config.text.pad_token_id or 0
    steps: dict[str, list[float]] = {"ours": [], "hf": []}

    def ours():
        clock = StepClock(device, skip_first=False)
        out = generate(dense, ids, max_new_tokens=n, eos_token_id=[], streamer=clock)
        steps["ours"].append(clock.step_ms)
        return out

    def theirs():
        clock = StepClock(device, skip_first=True)
        out = hf.generate(ids_dev, attention_mask=torch.ones_like(ids_dev), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, pad_token_id=pad, streamer=clock)[:, ids.shape[1]:]
        steps["hf"].append(clock.step_ms)
        return out

    with torch.inference_mode():
        cache = dense(input_ids=ids_dev, use_cache=True, logits_to_keep="last", output_routing=False).past_key_values
        floor = floor_step(dense, cache)
        t = time_interleaved({"ours": ours, "hf": theirs, "floor": floor}, device, warmup, reps)
    per = {k: Timing(times_ms=v[-reps:]) for k, v in steps.items()}  # the timed repetitions only
    a, b = t["ours"].result.cpu(), t["hf"].result.cpu()
    fl = t["floor"].median_ms
    return {
        "floor_step_ms": fl, "ours_overhead_ms": per["ours"].median_ms - fl, "hf_overhead_ms": per["hf"].median_ms - fl,
        "overhead_ratio": (per["ours"].median_ms - fl) / max(per["hf"].median_ms - fl, 1e-9),
        "prompt_tokens": ids.shape[1], "new_tokens": n, "ours_generate": t["ours"].summary(),
        "hf_generate": t["hf"].summary(), "ours_step": per["ours"].summary(), "hf_step": per["hf"].summary(),
        "ours_step_ms": per["ours"].median_ms, "hf_step_ms": per["hf"].median_ms,
        "step_ratio": per["ours"].median_ms / per["hf"].median_ms,
        "step_ratio_min": per["ours"].min_ms / per["hf"].min_ms,
        "tokens_match": float((a == b).float().mean()) if a.shape == b.shape else 0.0,
    }


def bench_batching(dense, preset: Preset, device: str, warmup: int, reps: int) -> dict:
    """`preset.batch_prompts` text prompts of unequal length: one batched `generate` vs one call per prompt."""
    lo, hi, B = preset.batch_text[0], preset.batch_text[1], preset.batch_prompts
    lens = [lo + (hi - lo) * i // max(B - 1, 1) for i in range(B)]
    p = make_prompt(dense.config, [0] * B, lens, "cpu", seed=11)
    n = preset.batch_new_tokens
    gen = partial(generate, dense, max_new_tokens=n, eos_token_id=[])
    one = lambda: torch.cat([gen(p.input_ids[b : b + 1, : lens[b]]) for b in range(B)])
    t = time_interleaved({"batched": lambda: gen(p.input_ids, attention_mask=p.attention_mask), "one_by_one": one},
                         device, warmup, reps)
    return {
        "prompts": B, "prompt_lens": lens, "new_tokens": n, "batched": t["batched"].summary(),
        "one_by_one": t["one_by_one"].summary(), "speedup_median": t["one_by_one"].median_ms / t["batched"].median_ms,
        "speedup_min": t["one_by_one"].min_ms / t["batched"].min_ms,
        "tokens_equal": bool(torch.equal(t["batched"].result.cpu(), t["one_by_one"].result.cpu())),
    }


def bench_packing(dense, pmod, hf, preset: Preset, device: str, warmup: int, reps: int) -> list[dict]:
    """Decoder over a batch with unequal image counts: packed (ours) vs padded (ours filled; HF masked)."""
    cfg, rows = dense.config, []
    packed = make_prompt(cfg, preset.packed_images, preset.n_text, device, seed=3)
    filled = make_prompt(cfg, preset.packed_images, preset.n_text, device, seed=3, fill=True)
    x, layout = dense.prepare(packed.input_ids, packed.images, None, packed.attention_mask)
    xf, layout_f = dense.prepare(filled.input_ids, filled.images, None, filled.attention_mask)
    real = layout.merged_mask()  # [B, M]
    for name, model in (("dense", dense), ("prd", pmod)):
        fns = {"packed": partial(_decoder, model, x, layout), "padded_ours": partial(_decoder, model, xf, layout_f)}
        if name == "dense":
            fns["padded_hf"] = partial(_hf_hidden, hf, layout.pad(x), real.long())  # [B, M, C], [B, M]
        t = time_interleaved(fns, device, warmup, reps)
        ref = t["packed"].result.float()
        row = {"model": name, "images_per_row": list(preset.packed_images), "row_tokens": packed.merged_lens,
               "packed_tokens": x.shape[0], "padded_tokens": xf.shape[0], "packed": t["packed"].summary()}
        for v in [k for k in fns if k != "packed"]:
            out = t[v].result.float()
            out = out.view(*real.shape, -1)[real] if v == "padded_ours" else out[real]
            row[v] = {**t[v].summary(), "speedup_median": t[v].median_ms / t["packed"].median_ms,
                      "speedup_min": t[v].min_ms / t["packed"].min_ms, "max_abs_diff": (out - ref).abs().max().item()}
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------- checks and reports
def evaluate_checks(res: dict) -> list[dict]:
    """The issue's bars, each with the figure measured in this run (ratios of medians)."""
    checks = []

    def add(name, value, bar, ok, what):
        checks.append({"name": name, "value": value, "bar": bar, "pass": bool(ok), "what": what})

    for r in res.get("prefill", []):
        if r["model"] == "prd":
            add(f"prefill_vs_ideal@{r['n_vision']}", r["fraction_of_ideal"], ">= 0.95", r["fraction_of_ideal"] >= 0.95,
                f"p-MoD/dense prefill speed-up {r['speedup_median']:.3f} / ideal {r['ideal_speedup']:.3f}")
    dec = res.get("decode", [])
    for r in dec:
        if r["model"] != "prd" or r["batch"] != max(x["batch"] for x in dec):
            continue
        d = next(x for x in dec
                 if x["model"] == "dense" and x["batch"] == r["batch"] and x["n_vision"] == r["n_vision"])
        ratio = r["tokens_per_s"] / d["tokens_per_s"]
        add(f"decode_b{r['batch']}_pmod_vs_dense@{r['n_vision']}", ratio, ">= 1.0", ratio >= 1.0,
            f"decode tokens/s p-MoD {r['tokens_per_s']:.1f} vs dense {d['tokens_per_s']:.1f}")
        add(f"kv_ratio@{r['n_vision']}", r["kv_ratio"], "<= 0.56", r["kv_ratio"] <= 0.56,
            "KV bytes p-MoD / dense, text tokens included (measured from the cache)")
        add(f"kv_vision_ratio@{r['n_vision']}", r["kv_vision_ratio"], "<= 0.56", r["kv_vision_ratio"] <= 0.56,
            "KV bytes of vision tokens p-MoD / dense (the paper's convention, integer k)")
    if "hf_decode" in res:
        h = res["hf_decode"]
        add("decode_step_vs_hf_generate", h["step_ratio"], "<= 0.6", h["step_ratio"] <= 0.6,
            f"batch-1 decode step ours {h['ours_step_ms']:.2f} ms vs HF generate {h['hf_step_ms']:.2f} ms "
            f"(GEMV + attention floor {h['floor_step_ms']:.2f} ms)")
        add("decode_overhead_vs_hf_generate", h["overhead_ratio"], "<= 0.6 (ours)", h["overhead_ratio"] <= 0.6,
            f"time above the floor: ours {h['ours_overhead_ms']:.2f} ms vs HF {h['hf_overhead_ms']:.2f} ms per step")
    if "batching" in res:
        b = res["batching"]
        add(f"batch{b['prompts']}_vs_one_by_one", b["speedup_median"], ">= 3.0", b["speedup_median"] >= 3.0,
            f"{b['prompts']} prompts: one by one {b['one_by_one']['median_ms']:.0f} ms vs batched "
            f"{b['batched']['median_ms']:.0f} ms")
    for r in res.get("hf_prefill", []):
        add(f"prefill_vs_hf_llamamodel@{r['n_tokens']}", r["ratio_median"], "<= 1.0", r["ratio_median"] <= 1.0,
            f"dense decoder ours {r['ours']['median_ms']:.1f} ms vs LlamaModel {r['hf']['median_ms']:.1f} ms")
    for r in res.get("packing", []):
        for v in ("padded_ours", "padded_hf"):
            if v in r:
                add(f"packed_vs_{v}[{r['model']}]", r[v]["speedup_median"], "> 1.0", r[v]["speedup_median"] > 1.0,
                    f"padded {r[v]['median_ms']:.1f} ms vs packed {r['packed']['median_ms']:.1f} ms")
    return checks


def _mib(x) -> str:
    return "-" if x is None else f"{x / 2**20:.1f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: str) -> list[str]:
    """Markdown table lines; `align` has one letter per column: l(eft) or r(ight)."""
    rule = "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|"
    return ["| " + " | ".join(header) + " |", rule, *("| " + " | ".join(str(c) for c in r) + " |" for r in rows), ""]


def _md_meta(m: dict) -> list[str]:
    return [
        f"# pmod bench — preset `{m['preset']}` on {m['device_name']}", "",
        (f"`{m['command']}` — {m['date']}, commit {m.get('commit')}; torch {m['torch']}, transformers "
        f"{m['transformers']}; {m['threads']} thread(s), {m['dtype']}, attention {m['attn_backend']}; warm-up "
        f"{m['warmup']}, {m['reps']} interleaved repetitions (median, min); routers ~ N(0, {m['router_std']}), "
        f"routing non-trivial: {m.get('routing_nontrivial')}; {m['seconds']:.0f} s in all."), "",
        (f"Load average {m.get('loadavg_start')} at start, {m.get('loadavg_end')} at end; share of the machine's CPU "
        f"time used by other processes, per section: {m.get('others_cpu_share')} (CPU timings are clean near 0)."), "",
    ]


def _md_prefill(rows: list[dict]) -> list[str]:
    head = ["vision tok", "model", "kept ratio", "TFLOPs", "ideal", "ideal, causal attn", "median ms", "min ms",
            "tok/s", "speed-up (median / min / paired)", "of ideal", "peak MiB", "KV MiB"]
    body = [[r["n_vision"], r["model"], f"{r['kept_ratio']:.3f}", f"{r['tflops']:.4f}", f"{r['ideal_speedup']:.3f}",
             f"{r['ideal_speedup_causal']:.3f}", f"{r['median_ms']:.1f}", f"{r['min_ms']:.1f}",
             f"{r['tokens_per_s']:.0f}",
             f"{r['speedup_median']:.3f} / {r['speedup_min']:.3f} / {r['speedup_paired']:.3f}",
             f"{r['fraction_of_ideal']:.3f}",
             _mib(r["peak_bytes"]), _mib(r["kv_bytes"])] for r in rows]
    return ["## Prefill (batch 1; speed-up and ideal vs dense; FLOPs: complete convention)", "",
            *_table(head, body, "rlrrrrrrrrrrr")]


def _md_decode(rows: list[dict]) -> list[str]:
    head = ["vision tok", "batch", "model", "ms/step", "tok/s", "KV MiB", "KV / dense", "vision KV / dense", "peak MiB"]
    body = [[r["n_vision"], r["batch"], r["model"], f"{r['ms_per_step']:.2f}", f"{r['tokens_per_s']:.1f}",
             _mib(r["kv_bytes"]), f"{r['kv_ratio']:.3f}", f"{r['kv_vision_ratio']:.3f}", _mib(r["peak_bytes"])]
            for r in rows]
    return [f"## Decode ({rows[0]['steps']} greedy steps over the prefilled prompt)", "",
            *_table(head, body, "rrlrrrrrr")]


def _md_hf_prefill(rows: list[dict]) -> list[str]:
    head = ["tokens", "ours ms (median / min)", "LlamaModel ms (median / min)", "ours / HF", "max abs diff"]
    body = [[r["n_tokens"], f"{r['ours']['median_ms']:.1f} / {r['ours']['min_ms']:.1f}",
             f"{r['hf']['median_ms']:.1f} / {r['hf']['min_ms']:.1f}", f"{r['ratio_median']:.3f}",
             f"{r['max_abs_diff']:.2e}"] for r in rows]
    return ["## Dense decoder prefill vs transformers.LlamaModel (same weights and inputs_embeds, no cache)", "",
            *_table(head, body, "rrrrr")]


def _md_hf_decode(h: dict) -> list[str]:
    n = h["new_tokens"]
    return ["## Batch-1 decode step: pmod.generate vs LlamaForCausalLM.generate (same weights)", "",
            (f"Time from the 1st to the {n}th new token / {n - 1} (streamer stamps, prefill excluded), prompt of "
            f"{h['prompt_tokens']} text tokens: ours {h['ours_step_ms']:.2f} ms, HF {h['hf_step_ms']:.2f} ms "
            f"(medians), ratio {h['step_ratio']:.3f} (from mins {h['step_ratio_min']:.3f}); whole calls "
            f"{h['ours_generate']['median_ms']:.0f} vs {h['hf_generate']['median_ms']:.0f} ms; greedy tokens equal: "
            f"{100 * h['tokens_match']:.0f} %."), "",
            (f"Floor (`floor_step`: each weight matrix times one token plus attention over the cache, nothing else): "
             f"{h['floor_step_ms']:.2f} ms. Above it: ours {h['ours_overhead_ms']:.2f} ms, HF {h['hf_overhead_ms']:.2f} ms "
             f"per step (ratio {h['overhead_ratio']:.2f}). Where the floor is most of a step, the step is bound by "
             "memory bandwidth (reading the weights once per token) and no loop can be much faster than it."), ""]


def _md_batching(b: dict) -> list[str]:
    return ["## Batched vs one-by-one generation (dense, text prompts)", "",
            (f"{b['prompts']} prompts of {b['prompt_lens'][0]}–{b['prompt_lens'][-1]} tokens, {b['new_tokens']} new "
            f"tokens each: batched {b['batched']['median_ms']:.0f} ms, one by one {b['one_by_one']['median_ms']:.0f} "
            f"ms, speed-up {b['speedup_median']:.2f} (from mins {b['speedup_min']:.2f}); tokens equal: "
            f"{b['tokens_equal']}."), ""]


def _md_packing(rows: list[dict]) -> list[str]:
    r0 = rows[0]

    def cell(v):
        return "-" if v is None else f"{v['median_ms']:.1f} ({v['speedup_median']:.2f}×), diff {v['max_abs_diff']:.1e}"

    head = ["model", "packed ms", "padded, ours (rows filled) ms", "padded, HF LlamaModel + mask ms"]
    body = [[r["model"], f"{r['packed']['median_ms']:.1f}", cell(r["padded_ours"]), cell(r.get("padded_hf"))]
            for r in rows]
    return [(f"## Packed vs padded decoder (images per row {r0['images_per_row']}, rows of {r0['row_tokens']} "
             f"tokens: {r0['packed_tokens']} packed, {r0['padded_tokens']} padded)"), "", *_table(head, body, "lrrr")]


def write_markdown(res: dict, path: Path) -> str:
    """results.md: the run's metadata, one table per section, then the checks."""
    lines = _md_meta(res["meta"])
    for key, fmt in (("prefill", _md_prefill), ("decode", _md_decode), ("hf_prefill", _md_hf_prefill),
                     ("hf_decode", _md_hf_decode), ("batching", _md_batching), ("packing", _md_packing)):
        if res.get(key):
            lines += fmt(res[key])
    body = [[c["name"], f"{c['value']:.3f}", c["bar"], "yes" if c["pass"] else "**no**", c["what"]]
            for c in res["checks"]]
    lines += ["## Checks", "", *_table(["check", "measured", "bar", "pass", "what"], body, "lrlll")]
    text = "\n".join(lines)
    path.write_text(text)
    return text


def plot_speedup(prefill_rows: list[dict], path: Path) -> None:
    """speedup.png: measured prefill speed-up vs kept-token ratio per prompt size, the FLOPs ratio as the ideal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, n_v in enumerate(sorted({r["n_vision"] for r in prefill_rows})):
        rows, color = [r for r in prefill_rows if r["n_vision"] == n_v], f"C{i}"
        line = sorted((r for r in rows if r["model"] != "prd"), key=lambda r: r["kept_ratio"])  # dense + constant
        ax.plot([r["kept_ratio"] for r in line], [r["ideal_speedup"] for r in line], "--", color=color,
                label=f"{n_v} vision tokens: ideal (FLOPs ratio)")
        ax.plot([r["kept_ratio"] for r in line], [r["speedup_median"] for r in line], "o-", color=color,
                label=f"{n_v}: measured, deep_all at constant ratios")
        for r in (r for r in rows if r["model"] == "prd"):
            ax.plot(r["kept_ratio"], r["ideal_speedup"], "x", color=color, markersize=9)
            ax.plot(r["kept_ratio"], r["speedup_median"], "*", color=color, markersize=13,
                    label=f"{n_v}: measured, default PRD (x: its ideal)")
    ax.set_xlabel("kept-token ratio (vision tokens processed per layer / all, mean over layers)")
    ax.set_ylabel("prefill speed-up over dense")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def machine_info(device: str) -> dict:
    """CPU model, core count, GPU, library versions, date and commit, for the record."""
    import os

    import transformers

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                                check=False, cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    gpu = torch.cuda.get_device_name() if device.startswith("cuda") else None
    load = _loadavg()
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "gpu": gpu, "device_name": gpu or f"CPU ({cpu})",
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "commit": commit, "loadavg_start": load}


def _cpu_seconds() -> tuple[float, float] | None:
    """(CPU seconds busy on the whole machine, CPU seconds of this process), from /proc/stat and os.times."""
    import os

    try:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return None
    busy = sum(vals) - vals[3] - (vals[4] if len(vals) > 4 else 0)  # all but idle and iowait
    own = os.times()
    return busy / os.sysconf("SC_CLK_TCK"), own.user + own.system


def _others_share(c0, c1, wall: float) -> float | None:
    """Share of all cores' time that other processes used: a CPU timing is clean only when this is ~0."""
    import os

    if c0 is None or c1 is None or wall <= 0:
        return None
    return round(max(0.0, (c1[0] - c0[0]) - (c1[1] - c0[1])) / (wall * (os.cpu_count() or 1)), 3)


def _loadavg() -> list[float] | None:
    """1/5/15-minute load averages: a CPU run is only meaningful when load <= threads (others share the cores)."""
    try:
        with open("/proc/loadavg") as f:
            return [float(x) for x in f.read().split()[:3]]
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------- the run
def run_benchmark(preset: Preset, device: str, sections: Sequence[str] = SECTIONS, seed: int = 0,
                  attn_backend: str = "auto", log: Callable[[str], None] = print) -> dict:
    """Every requested section on one set of weights; returns the results dict (checks included)."""
    t_start = time.perf_counter()
    if attn_backend == "auto" and preset.dtype == torch.float32:
        attn_backend = "sdpa"  # `auto` would pick flash on CUDA, which takes fp16/bf16 only
    res: dict = {"meta": {**machine_info(device), "preset": preset.name,
                          "dtype": str(preset.dtype).replace("torch.", ""), "text": preset.text,
                          "vision_stand_in": preset.clip, "warmup": preset.warmup, "reps": preset.reps,
                          "router_std": preset.router_std, "seed": seed,
                          "attn_backend": resolve_backend(attn_backend, device).name}}
    w, n = preset.warmup, preset.reps
    with torch.no_grad():  # ordinary tensors (not inference tensors), frozen
        dense = build_dense(preset, device, seed, attn_backend)
        variants = {name: with_routers(dense, mod, preset.router_std, seed + 1)
                    for name, mod in schedules(preset).items()}
        hf = hf_llama(dense) if {"hf_prefill", "hf_decode", "packing"} & set(sections) else None
    pmod = variants["prd"]
    gc.collect()
    gc.freeze()  # the long-lived heap (modules, weights) leaves the collector's view: per-rep collections stay cheap
    with torch.inference_mode():
        res["meta"]["mod_layers"] = {k: v for k, v in pmod.config.mod_ratios.items()}
        probe = make_prompt(dense.config, [1], preset.n_text, device)
        res["meta"]["routing_nontrivial"] = _routing_nontrivial(pmod, probe)
        res["meta"]["section_seconds"] = {}
        jobs = {
            "prefill": lambda: bench_prefill(dense, variants, preset, device, w, n),
            "decode": lambda: bench_decode(dense, pmod, preset, device, w, n),
            "hf_prefill": lambda: bench_hf_prefill(dense, hf, preset, device, w, n),
            "hf_decode": lambda: bench_hf_decode(dense, hf, preset, device, w, n),
            "batching": lambda: bench_batching(dense, preset, device, w, n),
            "packing": lambda: bench_packing(dense, pmod, hf, preset, device, w, n),
        }
        res["meta"]["others_cpu_share"] = {}
        for name in [s for s in SECTIONS if s in sections]:
            t0, c0 = time.perf_counter(), _cpu_seconds()
            log(f"[pmod bench] {name} ...")
            res[name] = jobs[name]()
            res["meta"]["section_seconds"][name] = round(time.perf_counter() - t0, 1)
            res["meta"]["others_cpu_share"][name] = _others_share(c0, _cpu_seconds(), time.perf_counter() - t0)
            log(f"[pmod bench] {name} done in {res['meta']['section_seconds'][name]:.1f} s; other processes used "
                f"{res['meta']['others_cpu_share'][name]} of the machine's CPU time")
    gc.unfreeze()
    res["checks"] = evaluate_checks(res)
    res["meta"]["seconds"] = time.perf_counter() - t_start
    res["meta"]["loadavg_end"] = _loadavg()
    return res


def resolve_preset(name: str, quick: bool = False, **overrides) -> Preset:
    """A preset by name, with its --quick overrides and explicit ones (None values ignored)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    p = PRESETS[name]
    changes = {**(p.quick if quick else {}), **{k: v for k, v in overrides.items() if v is not None}}
    return dataclasses.replace(p, **changes)


def add_parser(sub) -> None:
    """Register `pmod bench`."""
    p = sub.add_parser("bench", help="dense vs p-MoD efficiency on the same random weights "
                                     "(prefill, decode, KV, FLOPs)")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda if available")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="shapes: cpu (hidden 512, 32 layers, fp32), gpu-7b (Vicuna-7B shapes, bf16), "
                        "tiny (smoke test); default: gpu-7b on cuda, cpu otherwise")
    p.add_argument("--output", default="out/bench", help="folder for results.json, results.md, speedup.png")
    p.add_argument("--quick", action="store_true", help="fewer repetitions, steps and schedules")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (CPU runs)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default: the preset's)")
    p.add_argument("--warmup", type=int, default=None, help="untimed warm-up rounds (default: the preset's)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--attn-backend", default="auto", choices=["auto", "sdpa", "flash", "eager"])
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=run)


def _command(args) -> str:
    parts = ["pmod bench", f"--device {args.device}", f"--preset {args.preset}", f"--output {args.output}"]
    parts += ["--quick"] if args.quick else []
    parts += [f"--{k} {getattr(args, k)}" for k in ("threads", "reps", "warmup") if getattr(args, k) is not None]
    parts += [f"--sections {args.sections}"] if args.sections != ",".join(SECTIONS) else []
    parts += [f"--attn-backend {args.attn_backend}"] if args.attn_backend != "auto" else []
    return " ".join(parts)


def run(args) -> int:
    """`pmod bench`: run, write results.json / results.md / speedup.png, end stdout with one JSON line."""
    import transformers

    transformers.logging.set_verbosity_error()
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but torch sees no CUDA device")
    args.preset = args.preset or ("gpu-7b" if args.device == "cuda" else "cpu")
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = sorted(set(sections) - set(SECTIONS))
    if bad:
        raise ValueError(f"unknown sections {bad}; expected a subset of {list(SECTIONS)}")
    if args.device == "cpu":
        torch.set_num_threads(max(1, args.threads))
    preset = resolve_preset(args.preset, args.quick, reps=args.reps, warmup=args.warmup)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    log = lambda s: print(s, file=sys.stderr, flush=True)
    res = run_benchmark(preset, args.device, sections, args.seed, args.attn_backend, log)
    res["meta"]["command"] = _command(args)
    (out / "results.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    print(write_markdown(res, out / "results.md"))
    if res.get("prefill"):
        plot_speedup(res["prefill"], out / "speedup.png")
    summary = {"preset": preset.name, "device": res["meta"]["device_name"], "output": str(out),
               "seconds": round(res["meta"]["seconds"], 1), "all_pass": all(c["pass"] for c in res["checks"]),
               "checks": {c["name"]: {"value": round(c["value"], 4), "bar": c["bar"], "pass": c["pass"]}
                          for c in res["checks"]}}
    print(json.dumps(summary), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m pmod.bench ...`: the bench sub-command without the rest of the CLI."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pmod.bench")
    sub = parser.add_subparsers(dest="cmd")
    add_parser(sub)
    return run(parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    sys.exit(main())
