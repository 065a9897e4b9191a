"""Eager vs `model.compile()` prefill and decode on the CPU: the bench `cpu` preset's shapes with fewer layers
(compiling 32 unrolled layers takes minutes on a 2-core machine; per-layer work is the same).

    python eval/compile_bench.py [--layers 8] [--reps 5] [--threads 2]
The last stdout line is the JSON of the rows (the `compiled` section of `pmod bench`)."""
from __future__ import annotations

import argparse
import json

import torch

import pmod.bench.compiled  # noqa: F401  (registers the `compiled` section)
from pmod.bench.cli import run_benchmark
from pmod.bench.presets import PRESETS, resolve_preset


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    text = dict(PRESETS["cpu"].text, num_hidden_layers=a.layers)
    preset = resolve_preset("cpu", text=text, images=(1,), sweep=(), decode_steps=8, reps=a.reps, warmup=1)
    res = run_benchmark(preset, "cpu", ["compiled"], progress=False)
    print(json.dumps(res["compiled"]))


if __name__ == "__main__":
    main()
