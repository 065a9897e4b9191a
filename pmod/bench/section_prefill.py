"""Bench section `prefill`: dense vs each p-MoD variant at each prompt size, against the FLOPs-ideal speed-up."""
from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch

from pmod.bench import report
from pmod.bench.calls import Prompt, make_prompt, prefill
from pmod.bench.presets import Preset
from pmod.bench.registry import BenchContext, Section, register_section
from pmod.bench.timing import _median, time_interleaved
from pmod.config import PmodConfig
from pmod.flops import attention_flops, count_flops

__all__ = ["bench_prefill", "ideal_curve"]


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


# calls: what the section hands `time_interleaved` (callables x rounds), the length of its progress bar
def _prefill_calls(c: BenchContext) -> int:
    p = c.preset
    return c.rounds * sum(2 + (len(p.sweep) if k in p.sweep_images else 0) for k in p.images)


register_section(Section("prefill", lambda c: bench_prefill(c.dense, c.variants, c.preset, c.device, c.warmup, c.reps),
                         _prefill_calls, report.md_prefill))
