"""Where a batch-1 prefill spends its time on the host: dense vs p-MoD, at 7B shapes (bf16, random weights).

    python eval/prefill_host_cost.py                 # a CUDA device; ~1 min
    python eval/prefill_host_cost.py --device cpu --preset cpu   # the same accounting on the CPU preset

Per model and vision-token count: the synced wall time of a prefill, the host time until the call returns
(no sync), and from one profiled call the CUDA runtime calls it made (kernel launches, memcpys, syncs) and the
top-level ATen ops. When the host time is close to the wall time, the prefill is bound by the host, and
p-MoD's speed-up is decided by how many ops and launches its routing adds, not by its FLOPs.
"""
from __future__ import annotations

import argparse
import time
from collections import Counter

import torch
from torch.profiler import ProfilerActivity, profile

from pmod.bench.calls import make_prompt, prefill
from pmod.bench.models import build_dense, with_routers
from pmod.bench.presets import resolve_preset
from pmod.config import ModConfig


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _times(fn, device: str, reps: int) -> tuple[float, float, float]:
    """(median synced wall ms, min wall ms, median host ms until return) over `reps` calls."""
    wall, host = [], []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        _sync(device)
        t2 = time.perf_counter()
        host.append((t1 - t0) * 1e3)
        wall.append((t2 - t0) * 1e3)
    return sorted(wall)[reps // 2], min(wall), sorted(host)[reps // 2]


def _profile(fn, device: str) -> dict:
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        _sync(device)
    runtime = Counter()
    aten = 0
    for e in prof.events():
        name = e.name
        if name.startswith("cuda") and not name.startswith("cudaGetDevice"):
            runtime[name] += 1
        elif name.startswith("aten::") and e.cpu_parent is None:
            aten += 1
    return {"top-level aten ops": aten, **dict(runtime.most_common(8))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--preset", default="gpu-7b")
    ap.add_argument("--layers", type=int, default=None, help="override the decoder depth (a quick look)")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--images", type=int, nargs="+", default=[1, 5], help="images of 576 tokens in the prompt")
    args = ap.parse_args()
    p = resolve_preset(args.preset)
    if args.layers:
        p = resolve_preset(args.preset, text=dict(p.text, num_hidden_layers=args.layers))
    dense = build_dense(p, args.device)
    models = {"dense": dense, "p-MoD": with_routers(dense, ModConfig(), p.router_std)}
    print(f"{args.preset} on {torch.cuda.get_device_name() if args.device == 'cuda' else args.device}, torch {torch.__version__}")
    for n_img in args.images:
        prompt = make_prompt(dense.config, [n_img], p.n_text, args.device)
        print(f"\n{prompt.n_vision[0]} vision tokens + {p.n_text} text")
        for name, m in models.items():
            call = lambda m=m, prompt=prompt: prefill(m, prompt)
            with torch.inference_mode():
                for _ in range(2):
                    call()
                wall, wmin, host = _times(call, args.device, args.reps)
                prof = _profile(call, args.device)
            print(f"  {name:6s} wall {wall:7.2f} ms (min {wmin:7.2f}) | host {host:7.2f} ms ({host / wall:4.0%}) | {prof}")


if __name__ == "__main__":
    main()
