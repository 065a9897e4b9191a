"""Write a tiny pmod_synth dataset (default: 12 samples into ./data next to this file) so that the whole
evaluation path runs on a fresh machine with no network:

    python eval/tasks/pmod_synth/make_tiny.py [--out DIR] [--n 12] [--image-size 64]
    lmms-eval --model pmod --model_args pretrained=CKPT --tasks pmod_synth --include_path eval/tasks

The format (test.jsonl with id, image, question, answer, type; images/) is what pmod.synthetic writes, so the
embedded-default data can replace it as is.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from pmod.evaluation.run import write_tiny_synth

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "data")
    p.add_argument("--n", type=int, default=12)
    p.add_argument("--image-size", type=int, default=64)
    a = p.parse_args()
    print(write_tiny_synth(a.out, n=a.n, image_size=a.image_size))
