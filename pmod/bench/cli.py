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
from pmod.bench.presets import PRESETS, Preset, resolve_preset, schedules
from pmod.bench.registry import BenchContext, get_section, section_names
from pmod.bench.report import atomic_write, evaluate_checks, plot_speedup, write_markdown
from pmod.bench.sections import _routing_nontrivial, ideal_curve  # (importing sections registers the built-ins)
from pmod.bench.timing import _cpu_seconds, _loadavg, _others_share, machine_info, ticking


# ---------------------------------------------------------------------------------------------- the run
def run_benchmark(preset: Preset, device: str, sections: Sequence[str] | None = None, seed: int = 0,
                  attn_backend: str = "auto", log: Callable[[str], None] = print,
                  on_section: Callable[[dict], None] | None = None, progress: bool = True) -> dict:
    """Every requested section (default: all that run on `device`) on one set of weights; returns the results dict
    (checks included). `on_section(res)` is called after each section with the results so far (checks and
    `meta.finished` up to date), so that a caller can write them before the next section starts. `progress`: one
    tqdm bar per section on stderr."""
    from tqdm import tqdm

    t_start = time.perf_counter()
    sections = list(section_names(device) if sections is None else sections)
    for name in sections:
        get_section(name)  # unknown names fail before any model is built
    if attn_backend == "auto" and preset.dtype == torch.float32:
        attn_backend = "sdpa"  # `auto` would pick flash on CUDA, which takes fp16/bf16 only
    res: dict = {"meta": {**machine_info(device), "preset": preset.name,
                          "dtype": str(preset.dtype).replace("torch.", ""), "text": preset.text,
                          "vision_stand_in": preset.clip, "warmup": preset.warmup, "reps": preset.reps,
                          "router_std": preset.router_std, "seed": seed,
                          "attn_backend": resolve_backend(attn_backend, device).name,
                          "sections": sections, "finished": [], "complete": False}}
    w, n = preset.warmup, preset.reps
    with torch.no_grad():  # ordinary tensors (not inference tensors), frozen
        dense = build_dense(preset, device, seed, attn_backend)
        variants = {name: with_routers(dense, mod, preset.router_std, seed + 1)
                    for name, mod in schedules(preset).items()}
        hf = hf_llama(dense) if any(get_section(s).needs_hf for s in sections) else None
    ctx = BenchContext(preset, device, w, n, dense, variants, hf)
    meta = res["meta"]
    gc.collect()
    gc.freeze()  # the long-lived heap (modules, weights) leaves the collector's view: per-rep collections stay cheap
    try:
        with torch.inference_mode():
            meta["mod_layers"] = {k: v for k, v in ctx.pmod.config.mod_ratios.items()}
            probe = make_prompt(dense.config, [1], preset.n_text, device)
            meta["routing_nontrivial"] = _routing_nontrivial(ctx.pmod, probe)
            meta.update(section_seconds={}, others_cpu_share={}, progress={})
            for name in sections:
                section = get_section(name)
                total = section.calls(ctx)
                t0, c0 = time.perf_counter(), _cpu_seconds()
                bar = tqdm(total=total, desc=f"[pmod bench] {name}", unit="call", file=sys.stderr, leave=True,
                           disable=not progress, dynamic_ncols=True)
                calls = [0]

                def tick(calls=calls, bar=bar) -> None:
                    calls[0] += 1
                    bar.update()

                try:
                    with ticking(tick):
                        res[name] = section.run(ctx)
                finally:
                    bar.close()
                dt = time.perf_counter() - t0
                meta["section_seconds"][name] = round(dt, 1)
                meta["others_cpu_share"][name] = _others_share(c0, _cpu_seconds(), dt)
                meta["progress"][name] = [calls[0], total]  # calls made vs declared (equal unless `calls` is stale)
                meta["finished"].append(name)
                _close(res, t_start)
                if on_section is not None:
                    on_section(res)  # written before it is announced: a run killed after the line keeps it
                log(f"[pmod bench] {name} done in {dt:.1f} s; other processes used "
                    f"{meta['others_cpu_share'][name]} of the machine's CPU time")
    finally:
        gc.unfreeze()
    meta["complete"] = True
    _close(res, t_start)
    return res


def _close(res: dict, t_start: float) -> None:
    """Checks and timings of the results so far (called after every section, so partial results read whole)."""
    res["checks"] = evaluate_checks(res)
    res["meta"]["seconds"] = time.perf_counter() - t_start
    res["meta"]["loadavg_end"] = _loadavg()


def write_outputs(res: dict, out: Path) -> None:
    """results.json, results.md and (with a prefill section) speedup.png in `out`, each written atomically."""
    atomic_write(out / "results.json", json.dumps(res, indent=2, default=str) + "\n")
    write_markdown(res, out / "results.md")
    if res.get("prefill"):
        m = res["meta"]
        preset = PRESETS.get(m["preset"])
        ideal = ({r["n_vision"]: ideal_curve(preset, r["n_vision"] // preset.config().vision.num_patches)
                  for r in res["prefill"]} if preset is not None else None)
        share = (m.get("others_cpu_share") or {}).get("prefill")
        note = (f"{m['device_name']}, {m['threads']} thread(s), {m['dtype']}, torch {m['torch']}; {m['date']}, "
                f"commit {m.get('commit')}; median of {m['reps']} interleaved repetitions"
                + (f"; other processes took {100 * share:.0f} % of the CPU" if share and m["gpu"] is None else ""))
        plot_speedup(res["prefill"], out / "speedup.png", ideal=ideal, note=note,
                     title=f"pmod bench, preset {m['preset']}: p-MoD prefill speed-up over dense")


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
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (CPU runs; default 2, 1 for the tiny preset, whose ops are too small to split)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default: the preset's)")
    p.add_argument("--warmup", type=int, default=None, help="untimed warm-up rounds (default: the preset's)")
    p.add_argument("--sections", default=None,
                   help=f"comma-separated subset of {','.join(section_names())} (default: all that run on the device)")
    p.add_argument("--attn-backend", default="auto", choices=["auto", "sdpa", "flash", "eager"])
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=run)


def _command(args) -> str:
    parts = ["pmod bench", f"--device {args.device}", f"--preset {args.preset}", f"--output {args.output}"]
    parts += ["--quick"] if args.quick else []
    parts += [f"--{k} {getattr(args, k)}" for k in ("threads", "reps", "warmup") if getattr(args, k) is not None]
    parts += [f"--sections {args.sections}"] if args.sections else []
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
    sections = ([s.strip() for s in args.sections.split(",") if s.strip()] if args.sections
                else list(section_names(args.device)))
    bad = sorted(set(sections) - set(section_names()))
    if bad:
        raise ValueError(f"unknown sections {bad}; expected a subset of {list(section_names())}")
    if args.threads is None:
        args.threads = 1 if args.preset == "tiny" else 2
    if args.device == "cpu":
        torch.set_num_threads(max(1, args.threads))
    preset = resolve_preset(args.preset, args.quick, reps=args.reps, warmup=args.warmup)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    log = lambda s: print(s, file=sys.stderr, flush=True)
    command = _command(args)

    def save(res: dict) -> None:
        res["meta"]["command"] = command
        write_outputs(res, out)

    try:
        res = run_benchmark(preset, args.device, sections, args.seed, args.attn_backend, log, on_section=save)
    except KeyboardInterrupt:
        log(f"[pmod bench] interrupted; the sections finished so far are in {out}/results.{{json,md}}")
        return 130
    save(res)
    print((out / "results.md").read_text())
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


