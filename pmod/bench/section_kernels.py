"""Bench section `kernels` (an extra: `pmod bench --sections kernels`): the MoD-layer kernels alone, the PyTorch
reference against Triton where it runs, forward and forward + backward, on one MoD layer's inputs at the preset's
shape (its first prompt size, half the vision tokens kept). The cases are `pmod_kernels.bench`'s; the timing is the
bench's (interleaved repetitions, medians). Legend: N packed tokens, C hidden, Nv vision rows, Nk kept rows."""
from __future__ import annotations

import torch

import pmod_kernels as pk
from pmod.bench.registry import BenchContext, Section, register_section
from pmod.bench.timing import time_interleaved
from pmod_kernels.bench import cases, make_case

__all__ = ["bench_kernels"]


def _backends(x: torch.Tensor) -> list[str]:
    return ["torch"] + (["triton"] if pk.pick_backend(x) == "triton" else [])


def _case(ctx: BenchContext) -> dict:
    p = ctx.preset
    vision = p.images[0] * p.config().vision.num_patches
    return make_case(1, p.n_text, vision, 0.5, p.text["hidden_size"], p.dtype, ctx.device)


def bench_kernels(ctx: BenchContext) -> dict:
    with torch.inference_mode(False), torch.enable_grad():  # the run is in inference mode; backward needs autograd
        c = _case(ctx)
        backends = _backends(c["x"])
        rows = {}
        for name in cases(c, "torch"):
            fwd, fwd_bwd = {}, {}
            for b in backends:
                fn, inputs = cases(c, b)[name]
                leaves = [t.detach().requires_grad_() for t in inputs]
                gy = torch.ones_like(fn(*inputs))
                fwd[b] = lambda fn=fn, inputs=inputs: fn(*inputs)
                fwd_bwd[b] = lambda fn=fn, leaves=leaves, gy=gy: torch.autograd.grad(fn(*leaves), leaves, gy)
            t_fwd = time_interleaved(fwd, ctx.device, ctx.warmup, ctx.reps)
            t_bwd = time_interleaved(fwd_bwd, ctx.device, ctx.warmup, ctx.reps)
            rows[name] = {b: {"fwd_ms": t_fwd[b].median_ms, "fwd_bwd_ms": t_bwd[b].median_ms} for b in backends}
    return {"N": c["x"].shape[0], "C": c["x"].shape[1], "Nv": c["rows"].numel(), "Nk": c["idx"].numel(),
            "dtype": str(ctx.preset.dtype).removeprefix("torch."), "backends": backends, "cases": rows}


def _markdown(r: dict) -> list[str]:
    lines = ["## MoD-layer kernels", "", f"N {r['N']}, C {r['C']}, Nv {r['Nv']}, Nk {r['Nk']}, {r['dtype']}; median ms.", "",
             "| kernel | " + " | ".join(f"{b} fwd | {b} fwd+bwd" for b in r["backends"]) + " |",
             "|---|" + "---:|---:|" * len(r["backends"])]
    for name, per in r["cases"].items():
        lines.append(f"| {name} | " + " | ".join(f"{per[b]['fwd_ms']:.3f} | {per[b]['fwd_bwd_ms']:.3f}"
                                                 for b in r["backends"]) + " |")
    return lines + [""]


def _calls(ctx: BenchContext) -> int:
    return 3 * 2 * len(_backends(_case(ctx)["x"])) * ctx.rounds  # 3 kernels x (fwd, fwd+bwd) x backends


register_section(Section("kernels", bench_kernels, _calls, _markdown, default=False))
