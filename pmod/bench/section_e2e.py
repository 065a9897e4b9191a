"""Bench sections a user's question maps to: batched prefill, and end-to-end generation (TTFT, decode, total).

* `prefill_batch`: generation's prefill (`bench.calls.prefill`, cache written, last logits) for dense and p-MoD on
  the same weights at batch 1, 8 and 32 (the preset's plan) and 576 / 2880 vision tokens: latency, tokens/s, paired
  speed-up and the FLOPs ideal. The cache is dropped after each call (memory: one model's cache at a time).
* `generate_e2e`: `generate` of `new_tokens` greedy tokens after a prompt of 576 (2880) vision + 64 text tokens,
  batch 1: time to first token (prefill + first sample), decode tokens/s between the first and the last token,
  total; eager, and on CUDA graph-captured (`cuda_graph=True`: the first call captures, in the warm-up; the timed
  calls reuse the pool's graph: `graph_captures_timed` counts captures during them, 0 expected) and compiled when
  the model class defines its own `compile` (nn.Module's does not count), each contender isolated: one that fails
  records its error and the others keep their numbers.
Legend: B rows, n_v vision tokens per row, n_t text tokens per row.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from pmod.bench.calls import make_prompt, prefill
from pmod.bench.registry import BenchContext, Section, register_section
from pmod.bench.report import _table
from pmod.bench.section_hf import StepClock
from pmod.bench.timing import _median, time_interleaved
from pmod.flops import count_flops
from pmod.generate import generate

__all__ = ["PLANS", "E2EPlan", "bench_generate_e2e", "bench_prefill_batch", "has_own_compile", "plan_for"]


@dataclass(frozen=True)
class E2EPlan:
    prefill_batches: tuple[int, ...] = (1, 8, 32)
    prefill_images: tuple[int, ...] = (1, 5)  # images of P tokens per row
    max_prefill_tokens: int = 100_000  # (B, images) pairs above this many tokens a call are skipped (recorded)
    gen_images: tuple[int, ...] = (1, 5)
    gen_text: int = 64
    new_tokens: int = 64


PLANS = {
    "gpu-7b": E2EPlan(),
    "cpu": E2EPlan(prefill_batches=(1, 8), prefill_images=(1,), gen_images=(1,), new_tokens=8),
    "tiny": E2EPlan(prefill_batches=(1, 3), prefill_images=(1, 3), gen_images=(1,), gen_text=10, new_tokens=4),
}


def plan_for(ctx: BenchContext) -> E2EPlan:
    return PLANS.get(ctx.preset.name, PLANS["cpu"])


def _pairs(ctx: BenchContext) -> list[tuple[int, int]]:
    p, P = plan_for(ctx), ctx.dense.config.vision.num_patches
    return [(B, k) for k in p.prefill_images for B in p.prefill_batches if B * (k * P + ctx.preset.n_text) <= p.max_prefill_tokens]


def bench_prefill_batch(ctx: BenchContext) -> list[dict]:
    """Prefill latency / throughput, dense vs p-MoD (PRD), per (batch, images)."""
    rows, P = [], ctx.dense.config.vision.num_patches
    plan = plan_for(ctx)
    for k in plan.prefill_images:
        rep = count_flops(ctx.pmod.config, n_vision=k * P, n_text=ctx.preset.n_text, convention="complete",
                          include_vision=True, n_images=k, last_only=True)
        for B in plan.prefill_batches:
            n_tok = B * (k * P + ctx.preset.n_text)
            if (B, k) not in _pairs(ctx):
                rows.append({"batch": B, "n_vision": k * P, "skipped": f"{n_tok} tokens > {plan.max_prefill_tokens}"})
                continue
            prompt = make_prompt(ctx.dense.config, [k] * B, ctx.preset.n_text, ctx.device, seed=100 + k)
            t = time_interleaved({"dense": partial(_prefill_dropped, ctx.dense, prompt),
                                  "prd": partial(_prefill_dropped, ctx.pmod, prompt)}, ctx.device,
                                 ctx.warmup, ctx.reps)
            d, m = t["dense"], t["prd"]
            rows.append({
                "batch": B, "n_vision": k * P, "n_text": ctx.preset.n_text, "tokens": n_tok,
                "dense_ms": d.median_ms, "prd_ms": m.median_ms, "dense": d.summary(), "prd": m.summary(),
                "dense_tokens_per_s": n_tok / (d.median_ms / 1e3), "prd_tokens_per_s": n_tok / (m.median_ms / 1e3),
                "speedup_paired": _median([a / b for a, b in zip(d.times_ms, m.times_ms)]),
                "ideal_speedup": rep.dense_total / rep.total,
            })
            rows[-1]["fraction_of_ideal"] = rows[-1]["speedup_paired"] / rows[-1]["ideal_speedup"]
    return rows


def _prefill_dropped(model, prompt) -> None:
    prefill(model, prompt)  # the cache is dropped on return: one model's cache alive at a time


def has_own_compile(model) -> bool:
    """True when the model class defines `compile` (our switch), not only nn.Module's in-place `compile`."""
    return getattr(type(model), "compile", None) is not nn.Module.compile


def _modes(ctx: BenchContext) -> list[str]:
    return ["eager"] + (["graph"] if ctx.device.startswith("cuda") else [])


def bench_generate_e2e(ctx: BenchContext) -> list[dict]:
    """TTFT, decode tokens/s and total of one greedy generation at batch 1, per model and mode."""
    from pmod.cudagraph import decode_graphs

    plan, rows = plan_for(ctx), []
    cuda = ctx.device.startswith("cuda")
    for k in plan.gen_images:
        prompt = make_prompt(ctx.dense.config, [k], plan.gen_text, ctx.device, seed=200 + k)
        for name, model in (("dense", ctx.dense), ("prd", ctx.pmod)):
            fns, laps, errors, tokens = {}, {}, {}, {}
            for mode in _modes(ctx):
                fns[mode] = partial(_one_generation, model, prompt, plan.new_tokens, mode == "graph", cuda,
                                    laps.setdefault(mode, []), errors, mode, tokens)
            pool = decode_graphs(model)
            for _ in range(ctx.warmup):  # warm-up by hand: the graph's capture happens here, then reuse is timed
                for fn in fns.values():
                    fn()
            before = pool.captures
            for m in laps:
                laps[m].clear()
            time_interleaved(fns, ctx.device, 0, ctx.reps)
            rows += [_gen_row(name, k, prompt, plan, mode, laps[mode], errors.get(mode), tokens)
                     for mode in fns]
            if cuda:
                rows[-1]["graph_captures_timed"] = pool.captures - before
            if has_own_compile(model):
                rows.append(_compiled_row(ctx, name, model, prompt, plan, k, cuda, tokens))
    return rows


def _one_generation(model, prompt, n: int, graph: bool, cuda: bool, laps: list, errors: dict, mode: str,
                    tokens: dict):
    if mode in errors:
        return None
    clock = StepClock("cuda" if cuda else "cpu")
    try:
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = generate(model, prompt.input_ids, images=prompt.images, max_new_tokens=n, eos_token_id=[],
                       streamer=clock, cuda_graph=graph)
        if cuda:
            torch.cuda.synchronize()
        end = time.perf_counter()
    except Exception as e:  # noqa: BLE001  recorded; the other contenders keep running
        errors[mode] = f"{type(e).__name__}: {e}"
        return None
    laps.append((t0, clock.stamps, end))
    tokens[mode] = out.cpu()
    return out


def _gen_row(name: str, k: int, prompt, plan: E2EPlan, mode: str, laps: list, error: str | None, tokens: dict) -> dict:
    row = {"model": name, "mode": mode, "n_vision": prompt.n_vision[0], "n_text": prompt.n_text[0],
           "new_tokens": plan.new_tokens}
    if error is not None or not laps:
        return {**row, "error": error or "no timed call"}
    ttft = [(s[0] - t0) * 1e3 for t0, s, _ in laps]
    total = [(end - t0) * 1e3 for t0, _, end in laps]
    dec = [(len(s) - 1) / max(s[-1] - s[0], 1e-9) for _, s, _ in laps]
    row.update(ttft_ms=_median(ttft), total_ms=_median(total), decode_tokens_per_s=_median(dec),
               ttft_ms_all=ttft, total_ms_all=total)
    if mode != "eager" and "eager" in tokens and mode in tokens:
        row["tokens_equal_eager"] = bool(torch.equal(tokens[mode], tokens["eager"]))
    return row


def _compiled_row(ctx, name, model, prompt, plan, k, cuda, tokens) -> dict:
    """Eager generate after `model.compile()` (the class's own switch), timed like the others; errors recorded."""
    laps, errors = [], {}
    try:
        model.compile()
    except Exception as e:  # noqa: BLE001
        return {"model": name, "mode": "compiled", "n_vision": k * ctx.dense.config.vision.num_patches,
                "error": f"{type(e).__name__}: {e}"}
    fn = partial(_one_generation, model, prompt, plan.new_tokens, False, cuda, laps, errors, "compiled", tokens)
    for _ in range(ctx.warmup):
        fn()
    laps.clear()
    time_interleaved({"compiled": fn}, ctx.device, 0, ctx.reps)
    return _gen_row(name, k, prompt, plan, "compiled", laps, errors.get("compiled"), tokens)


def _gen_calls(ctx: BenchContext) -> int:
    per = len(_modes(ctx)) * 2 * len(plan_for(ctx).gen_images)  # time_interleaved ticks the timed calls only
    extra = 2 * len(plan_for(ctx).gen_images) if has_own_compile(ctx.dense) else 0
    return ctx.reps * (per + extra)


def md_prefill_batch(rows: list[dict]) -> list[str]:
    head = ["B", "n_v", "tokens", "dense ms", "p-MoD ms", "p-MoD tok/s", "speed-up", "ideal", "of ideal"]
    body = [[r["batch"], r["n_vision"], r["tokens"], f"{r['dense_ms']:.1f}", f"{r['prd_ms']:.1f}",
             f"{r['prd_tokens_per_s']:.0f}", f"{r['speedup_paired']:.2f}", f"{r['ideal_speedup']:.2f}",
             f"{r['fraction_of_ideal']:.2f}"] for r in rows if "skipped" not in r]
    skipped = [f"B={r['batch']} n_v={r['n_vision']}: skipped ({r['skipped']})" for r in rows if "skipped" in r]
    return ["## Batched prefill (dense vs p-MoD, paired speed-up)", "", *_table(head, body, "rrrrrrrrr"), *skipped]


def md_generate_e2e(rows: list[dict]) -> list[str]:
    head = ["model", "mode", "n_v + n_t", "new", "TTFT ms", "decode tok/s", "total ms", "tokens = eager"]
    body = [[r["model"], r["mode"], f"{r['n_vision']} + {r.get('n_text', '?')}", r.get("new_tokens", ""),
             *((f"{r['ttft_ms']:.1f}", f"{r['decode_tokens_per_s']:.1f}", f"{r['total_ms']:.1f}",
                str(r.get("tokens_equal_eager", ""))) if "error" not in r else ("error: " + r["error"][:80], "", "", ""))]
            for r in rows]
    return ["## End-to-end generation (batch 1, greedy)", "", *_table(head, body, "llrrrrrl")]


register_section(Section("prefill_batch", bench_prefill_batch, lambda c: c.rounds * 2 * len(_pairs(c)), md_prefill_batch))
register_section(Section("generate_e2e", bench_generate_e2e, _gen_calls, md_generate_e2e))
