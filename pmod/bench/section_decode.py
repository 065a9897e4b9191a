"""Bench section `decode`: greedy decode steps at each batch size over a prefilled cache, dense vs p-MoD; KV bytes."""
from __future__ import annotations

from functools import partial

import torch

from pmod.bench import report
from pmod.bench.calls import Prompt, _rewind, _snapshot, decode_loop, make_prompt, prefill, replicate_rows
from pmod.bench.presets import Preset
from pmod.bench.registry import Section, register_section
from pmod.bench.timing import Timing, time_interleaved
from pmod.cache import PmodCache

__all__ = ["bench_decode"]


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


# calls: what the section hands `time_interleaved` (callables x rounds), the length of its progress bar
register_section(Section("decode", lambda c: bench_decode(c.dense, c.pmod, c.preset, c.device, c.warmup, c.reps),
                         lambda c: c.rounds * 2 * len(c.preset.images) * len(c.preset.decode_batches),
                         report.md_decode))
