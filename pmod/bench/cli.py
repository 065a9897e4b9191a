"""`pmod bench`: one run of every requested section on one set of weights, and its command line."""

from __future__ import annotations

import gc
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from pmod.attention import resolve_backend
from pmod.bench.calls import make_prompt
from pmod.bench.models import build_dense, hf_llama, with_routers
from pmod.bench.presets import PRESETS, SECTIONS, Preset, resolve_preset, schedules
from pmod.bench.report import evaluate_checks, plot_speedup, write_markdown
from pmod.bench.sections import (
    _routing_nontrivial,
    bench_batching,
    bench_decode,
    bench_hf_decode,
    bench_hf_prefill,
    bench_packing,
    bench_prefill,
)
from pmod.bench.timing import _cpu_seconds, _loadavg, _others_share, machine_info


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


