"""Micro-benchmark of the MoD-layer kernels: PyTorch reference vs Triton, forward and forward + backward.

    python -m pmod_kernels.bench [--rows 4 --text 100 --vision 576 --ratio 0.5 --hidden 4096 --dtype bfloat16]

Shapes default to a LLaVA-1.5-7B batch (4 rows of 100 text + 576 vision tokens, C = 4096, half the vision kept).
On CUDA both backends run; elsewhere only the reference. Prints one line per case, then one JSON line.
The same cases on a bench preset's shapes, interleaved torch vs triton: `pmod bench --sections kernels`.
Legend: N packed tokens, C hidden size, Nv vision rows, Nk kept rows.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import pmod_kernels as pk

__all__ = ["bench", "cases", "main", "make_case", "time_fwd_bwd", "time_ms"]


def make_case(rows: int, text: int, vision: int, ratio: float, hidden: int, dtype: torch.dtype, device: str) -> dict:
    """Random inputs of one MoD layer over `rows` rows of [text/2, vision, text/2] tokens, packed end to end."""
    per_row = text + vision
    N = rows * per_row
    g = torch.Generator().manual_seed(0)
    starts = torch.arange(rows) * per_row + text // 2
    vision_idx = (starts[:, None] + torch.arange(vision)).flatten()  # [Nv] ascending
    k = int(vision * ratio)
    chosen = (starts[:, None] + torch.randperm(vision, generator=g)[:k].sort().values).flatten()
    keep = torch.ones(N, dtype=torch.bool)
    keep[vision_idx] = False
    keep[chosen] = True
    idx = keep.nonzero().squeeze(1)  # [Nk]
    w_tok = torch.ones(N)
    w_tok[vision_idx] = 0.2 * torch.tanh(torch.randn(len(vision_idx), generator=g)) + 1
    case = {
        "x": torch.randn(N, hidden, generator=g),  # [N, C]
        "weight": torch.randn(1, hidden, generator=g) / hidden**0.5,  # [1, C]
        "bias": torch.zeros(1),
        "rows": vision_idx,  # [Nv]
        "idx": idx,  # [Nk]
        "w_tok": w_tok,  # [N]
        "h_mid": torch.randn(len(idx), hidden, generator=g),  # [Nk, C]
        "m": torch.randn(len(idx), hidden, generator=g),  # [Nk, C]
    }
    return {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in case.items()}


def time_ms(fn, device: str, warmup: int = 3, reps: int = 20) -> float:
    """Median wall time of fn() in milliseconds, synchronising the device around each call."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def cases(c: dict, backend: str) -> dict:
    """name -> (forward thunk, list of differentiable inputs)."""
    return {
        "router_weights": (
            lambda *a: pk.router_weights(*a, c["rows"], backend=backend),
            [c["x"], c["weight"], c["bias"]],
        ),
        "gather_rows": (lambda x: pk.gather_rows(x, c["idx"], backend=backend), [c["x"]]),
        "string_merge": (
            lambda x, w, h, m: pk.string_merge(x, w, c["idx"], h, m, backend=backend),
            [c["x"], c["w_tok"], c["h_mid"], c["m"]],
        ),
    }


def time_fwd_bwd(fn, inputs: list[torch.Tensor], device: str) -> dict:
    """Forward alone (no graph) and forward + backward of fn(*inputs), in ms."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    gy = torch.ones_like(fn(*leaves))
    with torch.no_grad():
        fwd = time_ms(lambda: fn(*inputs), device)
    fwd_bwd = time_ms(lambda: torch.autograd.grad(fn(*leaves), leaves, gy), device)
    return {"fwd_ms": round(fwd, 4), "fwd_bwd_ms": round(fwd_bwd, 4)}


def bench(c: dict, backend: str, device: str) -> dict:
    out = {}
    for name, (fn, inputs) in cases(c, backend).items():
        out[name] = time_fwd_bwd(fn, inputs, device)
        print(f"{name:15s} {backend:6s} fwd {out[name]['fwd_ms']:8.3f} ms  fwd+bwd {out[name]['fwd_bwd_ms']:8.3f} ms")
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--text", type=int, default=100)
    p.add_argument("--vision", type=int, default=576)
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 elsewhere")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    dtype = getattr(torch, a.dtype or ("bfloat16" if a.device.startswith("cuda") else "float32"))
    c = make_case(a.rows, a.text, a.vision, a.ratio, a.hidden, dtype, a.device)
    backends = ["torch"] + (["triton"] if pk.pick_backend(c["x"]) == "triton" else [])
    result = {
        "device": torch.cuda.get_device_name() if a.device.startswith("cuda") else a.device,
        "dtype": str(dtype).removeprefix("torch."),
        "N": c["x"].shape[0], "C": a.hidden, "Nv": c["rows"].numel(), "Nk": c["idx"].numel(),
        "results": {b: bench(c, b, a.device) for b in backends},
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
