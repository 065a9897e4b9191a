"""Bench section `train_step` (an extra: `pmod bench --sections train_step`): p-MoD vs dense training steps on the
preset's shapes, with the bench's interleaved repetitions. The step itself is `pmod.bench.train_step`'s."""
from __future__ import annotations

from functools import partial

import torch

from pmod.bench.registry import Section, register_section
from pmod.bench.timing import time_interleaved
from pmod.config import ModConfig
from pmod.flops import count_flops

__all__ = ["bench_train_step"]


def bench_train_step(ctx) -> dict:
    """The `train_step` section: p-MoD (PRD) vs dense training steps on the preset's shapes (batch 2, one image per
    row), interleaved. Its own models: the bench's shared ones are frozen for inference."""
    # imported here, not at the top: `python -m pmod.bench.train_step` must not find itself imported by the package
    from pmod.bench.train_step import make_batch, step_seconds, trainable_pair

    p, device, batch_size = ctx.preset, torch.device(ctx.device), 2
    with torch.inference_mode(False), torch.enable_grad():
        configs = {"dense": p.config(), "p-MoD": p.config(ModConfig())}
        models, opts = trainable_pair(configs, device, p.dtype, seed=0)
        batch = make_batch(configs["dense"], batch_size, p.n_text)
        fns = {n: partial(step_seconds, m, opts[n], batch, device) for n, m in models.items()}
        t = time_interleaved(fns, ctx.device, ctx.warmup, ctx.reps)
    n_vision = configs["dense"].vision.num_patches
    fl = count_flops(configs["p-MoD"], n_vision=n_vision, n_text=p.n_text, convention="complete")
    return {"batch": batch_size, "n_vision": n_vision, "n_text": p.n_text, "dense": t["dense"].summary(),
            "pmod": t["p-MoD"].summary(), "time_ratio": t["p-MoD"].median_ms / t["dense"].median_ms,
            "time_ratio_min": t["p-MoD"].min_ms / t["dense"].min_ms, "prefill_flops_ratio": fl.total / fl.dense_total}


def _markdown(r: dict) -> list[str]:
    return ["## Training step (forward, backward, AdamW)", "",
            f"Batch {r['batch']} x ({r['n_vision']} vision + {r['n_text']} text tokens): p-MoD / dense step time "
            f"{100 * r['time_ratio']:.1f} % of the median ({100 * r['time_ratio_min']:.1f} % of the fastest); prefill "
            f"FLOPs ratio {100 * r['prefill_flops_ratio']:.1f} %; the paper: 77.7 % of the GPU hours.", ""]


register_section(Section("train_step", bench_train_step, lambda c: 2 * c.rounds, _markdown, default=False))
