"""`python -m pmod.evaluation.pmod_synth --out DIR`: a pmod_synth dataset in DIR and a task folder DIR/tasks for
lmms-eval's --include_path (see the package docstring)."""
from __future__ import annotations

import argparse
from pathlib import Path

from pmod.evaluation.pmod_synth import DEFAULT_N
from pmod.evaluation.run import synth_task_folder, write_tiny_synth

p = argparse.ArgumentParser(prog="python -m pmod.evaluation.pmod_synth", description=__doc__.splitlines()[0])
p.add_argument("--out", type=Path, required=True, help="dataset folder (test.jsonl, images/) and its tasks/ folder")
p.add_argument("--n", type=int, default=DEFAULT_N, help=f"samples (default {DEFAULT_N})")
p.add_argument("--image-size", type=int, default=64)
a = p.parse_args()
tasks = synth_task_folder(a.out, write_tiny_synth(a.out, n=a.n, image_size=a.image_size))
print(f"wrote {a.n} samples to {a.out}; task folder for lmms-eval: --include_path {tasks}")
