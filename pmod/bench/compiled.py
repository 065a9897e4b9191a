"""The `compiled` bench section: eager vs `model.compile()` on the same weights, prefill and decode.

Both run in one process on the same model (compiled or not is a switch: dynamo's graphs are kept between
switches), interleaved rounds, the first compiled call (the compilation) inside the warm-up and timed apart.
Rows: model, phase, eager / compiled medians, the paired ratio eager / compiled (> 1: compiled is faster).
Registered when this module is imported (`eval/compile_bench.py` does), not among the built-ins: an inductor compile
takes minutes on a small CPU, which the default `pmod bench` run (and its tiny-preset test) should not pay.
"""
from __future__ import annotations

import time
from functools import partial

from pmod.bench.calls import decode_loop, make_prompt, prefill
from pmod.bench.registry import BenchContext, Section, register_section
from pmod.bench.timing import _median, time_interleaved

__all__ = ["bench_compiled"]


def _switched(model, compiled: bool, fn):
    """fn() with the model's compiled path on or off (`model.compile(disable=True)` is the eager model)."""
    model.compile() if compiled else model.compile(disable=True)
    try:
        return fn()
    finally:
        model.compile(disable=True)


def bench_compiled(ctx: BenchContext) -> list[dict]:
    rows = []
    prompt = make_prompt(ctx.dense.config, [ctx.preset.images[0]], ctx.preset.n_text, ctx.device)
    steps = ctx.preset.decode_steps
    for name, model in {"dense": ctx.dense, "prd": ctx.pmod}.items():
        t0 = time.perf_counter()
        first = _switched(model, True, partial(prefill, model, prompt, steps + 2))  # compiles prefill
        _switched(model, True, partial(decode_loop, model, first.past_key_values, first.logits, 2))  # and decode
        compile_s = time.perf_counter() - t0

        def run_decode(compiled: bool, model=model):
            out = prefill(model, prompt, steps)  # eager prefill in both: only the decode steps differ
            return _switched(model, compiled, partial(decode_loop, model, out.past_key_values, out.logits, steps))

        for phase, fns in {
            "prefill": {c: partial(_switched, model, c, partial(prefill, model, prompt)) for c in (False, True)},
            f"prefill + {steps} decode steps": {c: partial(run_decode, c) for c in (False, True)},
        }.items():
            t = time_interleaved({"eager": fns[False], "compiled": fns[True]}, ctx.device, ctx.warmup, ctx.reps)
            e, c = t["eager"], t["compiled"]
            rows.append({"model": name, "phase": phase, "eager_ms": e.median_ms, "compiled_ms": c.median_ms,
                         "speedup_paired": _median([a / b for a, b in zip(e.times_ms, c.times_ms)]),
                         "compile_s": compile_s, "n_tokens": prompt.n_vision[0] + prompt.n_text[0]})
    return rows


def _markdown(rows) -> list[str]:
    out = ["## Compiled (`model.compile()`) vs eager", "", "| model | phase | eager ms | compiled ms | paired ratio |",
           "|---|---|---|---|---|"]
    out += [f"| {r['model']} | {r['phase']} | {r['eager_ms']:.1f} | {r['compiled_ms']:.1f} | {r['speedup_paired']:.3f} |"
            for r in rows]
    return out + [""]


register_section(Section("compiled", run=bench_compiled, calls=lambda ctx: 2 * 4 * ctx.rounds, markdown=_markdown))
