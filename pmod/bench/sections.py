"""The benchmark sections: prefill, decode, against transformers, batching, packing. Each returns plain rows."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F

from pmod.bench import report
from pmod.bench.calls import Prompt, _decoder, _rewind, _snapshot, decode_loop, make_prompt, prefill, replicate_rows
from pmod.bench.presets import Preset
from pmod.bench.registry import BenchContext, Section, register_section
from pmod.bench.timing import Timing, _median, time_interleaved
from pmod.cache import PmodCache
from pmod.config import PmodConfig
from pmod.flops import attention_flops, count_flops
from pmod.generate import generate


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


def ideal_curve(preset: Preset, images: int, ratios: Sequence[float] | None = None) -> list[tuple[float, float]]:
    """(kept ratio, ideal speed-up) of `deep_all` at constant ratios (default 0.05 ... 1), counted as `bench_prefill`
    counts its rows (complete convention, vision stand-in and projector, lm_head on the last token): the ideal line of
    the plot, whatever sweep a run measured. Pure FLOPs arithmetic, no model."""
    from pmod.config import ModConfig

    n_v, n_t, out = images * preset.config().vision.num_patches, preset.n_text, []
    for r in ratios or [i / 20 for i in range(1, 21)]:
        cfg = preset.config(ModConfig(schedule="deep_all", avg_ratio=r))
        rep = count_flops(cfg, n_vision=n_v, n_text=n_t, convention="complete", include_vision=True, n_images=images,
                          last_only=True)
        kept = sum(n - n_t for n in rep.tokens_per_layer) / (len(rep.tokens_per_layer) * n_v)
        out.append((kept, rep.dense_total / rep.total))
    return out


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
    for k in preset.hf_images or preset.images:
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
    """A generate streamer (transformers' protocol, which both generates follow) that timestamps every new token:
    the first `put` is the prompt, skipped. On CUDA it synchronises first, so a stamp marks a token that exists."""

    def __init__(self, device: str):
        self.cuda, self.skip, self.stamps = device.startswith("cuda"), True, []

    def put(self, value) -> None:
        if self.skip:
            self.skip = False
            return
        if self.cuda:
            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())

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
    graphs = device.startswith("cuda")  # the host-bound regime: CUDA graphs as a third contender
    steps: dict[str, list[float]] = {"ours": [], "hf": [], **({"ours_graph": []} if graphs else {})}

    def ours(graph: bool = False):
        clock = StepClock(device)
        out = generate(dense, ids, max_new_tokens=n, eos_token_id=[], streamer=clock, cuda_graph=graph)
        steps["ours_graph" if graph else "ours"].append(clock.step_ms)
        return out

    def theirs():
        clock = StepClock(device)
        out = hf.generate(ids_dev, attention_mask=torch.ones_like(ids_dev), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, pad_token_id=pad, streamer=clock)[:, ids.shape[1]:]
        steps["hf"].append(clock.step_ms)
        return out

    with torch.inference_mode():
        cache = dense(input_ids=ids_dev, use_cache=True, logits_to_keep="last", output_routing=False).past_key_values
        floor = floor_step(dense, cache)
        fns = {"ours": ours, "hf": theirs, "floor": floor, **({"ours_graph": partial(ours, True)} if graphs else {})}
        t = time_interleaved(fns, device, warmup, reps)
    per = {k: Timing(times_ms=v[-reps:]) for k, v in steps.items()}  # the timed repetitions only
    a, b = t["ours"].result.cpu(), t["hf"].result.cpu()
    fl = t["floor"].median_ms
    extra = {}
    if graphs:
        g = per["ours_graph"]
        extra = {"ours_graph_step": g.summary(), "ours_graph_step_ms": g.median_ms, "graph_step_ratio": g.median_ms / per["hf"].median_ms,
                 "graph_tokens_match": float(torch.equal(t["ours_graph"].result.cpu(), a))}
    return {**extra,
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


# ---------------------------------------------------------------------------------------------- the registry
# calls: what each section hands `time_interleaved` (callables x rounds), the length of its progress bar
def _prefill_calls(c: BenchContext) -> int:
    p = c.preset
    return c.rounds * sum(2 + (len(p.sweep) if k in p.sweep_images else 0) for k in p.images)


for _section in (
    Section("prefill", lambda c: bench_prefill(c.dense, c.variants, c.preset, c.device, c.warmup, c.reps),
            _prefill_calls, report.md_prefill),
    Section("decode", lambda c: bench_decode(c.dense, c.pmod, c.preset, c.device, c.warmup, c.reps),
            lambda c: c.rounds * 2 * len(c.preset.images) * len(c.preset.decode_batches), report.md_decode),
    Section("hf_prefill", lambda c: bench_hf_prefill(c.dense, c.hf, c.preset, c.device, c.warmup, c.reps),
            lambda c: c.rounds * 2 * len(c.preset.hf_images or c.preset.images), report.md_hf_prefill, needs_hf=True),
    Section("hf_decode", lambda c: bench_hf_decode(c.dense, c.hf, c.preset, c.device, c.warmup, c.reps),
            lambda c: c.rounds * (4 if c.device.startswith("cuda") else 3), report.md_hf_decode, needs_hf=True),
    Section("batching", lambda c: bench_batching(c.dense, c.preset, c.device, c.warmup, c.reps),
            lambda c: c.rounds * 2, report.md_batching),
    Section("packing", lambda c: bench_packing(c.dense, c.pmod, c.hf, c.preset, c.device, c.warmup, c.reps),
            lambda c: c.rounds * 5, report.md_packing, needs_hf=True),
):
    register_section(_section)
