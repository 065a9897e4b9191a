"""Accuracy of a model's decoder on the synthetic questions asked over scenes written in words (no image).

    python train/text_probe.py runs/embedded-default/language          # stage 1b's output
    python train/text_probe.py pmod/assets/tiny-synth-pmod --n 600

Separates what the decoder can do with a question from what it can see: a type at chance here (e.g. the
existence check) cannot be above chance over image patches either (BENCHMARKS.md, "what the decoder can
learn"). Scenes come from `pmod.tools.synthetic.text_conversations` at a seed of their own, unseen in training.
"""
from __future__ import annotations

import argparse
from collections import Counter

import torch

import pmod
from pmod.evaluation.synth_vqa import normalize
from pmod.tools.synthetic import QUESTION_TYPES, ask, describe, make_scene

PROBE_SEED = 9_000_011


def probe_records(n: int, seed: int = PROBE_SEED) -> list[dict]:
    """`n` single-question records per type: {"prompt", "answer", "type"} with the scene in words first."""
    import numpy as np

    out = []
    for qtype in QUESTION_TYPES:
        for i in range(n):
            rng = np.random.default_rng(seed + 7919 * QUESTION_TYPES.index(qtype) + i)
            scene = make_scene(rng)
            ((q, a, t),) = ask(scene, rng, 1, (qtype,))
            out.append({"prompt": describe(scene) + "\n" + q, "answer": a, "type": t})
    return out


def text_accuracy(model, processor, records: list[dict], batch_size: int = 50) -> dict[str, float]:
    ok, tot = Counter(), Counter()
    for i in range(0, len(records), batch_size):
        batch = records[i : i + batch_size]
        toks = model.generate(**processor([r["prompt"] for r in batch]), max_new_tokens=3, do_sample=False)
        for r, a in zip(batch, processor.batch_decode(toks)):
            ok[r["type"]] += normalize(a) == normalize(r["answer"])
            tot[r["type"]] += 1
    return {t: ok[t] / tot[t] for t in tot}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--n", type=int, default=100, help="questions per type")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = pmod.from_pretrained(args.model, dtype=torch.float32, device="cpu")
    acc = text_accuracy(model, pmod.load_processor(args.model), probe_records(args.n))
    print(f"{args.model} over words, {args.n} questions per type: "
          + ", ".join(f"{t} {100 * a:.0f} %" for t, a in sorted(acc.items())))


if __name__ == "__main__":
    main()
