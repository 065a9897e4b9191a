"""The synthetic-VQA scorer: greedy answers to `pmod_synth`-style records (question, image, answer, type), exact
match after normalising, with prefill FLOPs and KV bytes per question against the dense twin.

Used by `pmod demo`, the strategy comparison (`pmod.tools.compare`) and the training probes in `train/`.
"""
from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from pmod.evaluation.efficiency import measure_efficiency

__all__ = ["ASSETS", "DENSE_CKPT", "PMOD_CKPT", "EvalResult", "evaluate", "normalize", "progress", "say"]

# The embedded default: a tiny p-MoD LLaVA and its dense twin trained on this task (`train/embedded_default.py`).
ASSETS = Path(__file__).parents[1] / "assets"
PMOD_CKPT, DENSE_CKPT = ASSETS / "tiny-synth-pmod", ASSETS / "tiny-synth-dense"


def progress(it, desc: str):
    """A progress bar on stderr that is gone when it ends (printed lines never share its row; everything is printed
    with flush=True before a bar starts), and absent when stderr is not a terminal (logs stay plain)."""
    sys.stdout.flush()
    return tqdm(it, desc=desc, unit="batch", leave=False, file=sys.stderr, disable=None)


def say(*lines: str) -> None:
    print(*lines, sep="\n", flush=True)


def normalize(text: str) -> str:
    return re.sub(r"[^a-z0-9 ]", "", text.lower()).strip()


@dataclass
class EvalResult:
    name: str
    accuracy: float
    per_type: dict[str, float]
    n: int
    seconds: float
    tflops: float  # prefill TFLOPs per sample (complete convention, decoder + lm_head)
    tflops_dense: float
    kv_bytes: float  # per sample, measured from the cache
    kv_bytes_dense: float
    answers: list[str] = field(default_factory=list)


def evaluate(model, processor, records: list[dict], root: Path, batch_size: int = 32, max_new_tokens: int = 4,
             desc: str = "") -> EvalResult:
    """Greedy answers to every record, exact match after normalising; efficiency measured per batch."""
    if not records:
        raise ValueError("evaluate: no records to answer")

    answers, kv, kv_dense, fl, fl_dense = [], 0.0, 0.0, 0.0, 0.0
    t0 = time.perf_counter()
    for i in progress(range(0, len(records), batch_size), desc or "evaluating"):
        batch = records[i : i + batch_size]
        inputs = processor([r["question"] for r in batch], images=[[root / r["image"]] for r in batch])
        tokens, cache = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, return_cache=True)
        answers += processor.batch_decode(tokens)
        layout = model.prepare(inputs["input_ids"], inputs["images"], inputs["image_sizes"], inputs["attention_mask"])[1]
        eff = measure_efficiency(model.config, layout, None)
        kv, kv_dense, fl, fl_dense = kv + eff.kv_bytes, kv_dense + eff.kv_bytes_dense, fl + eff.tflops, fl_dense + eff.tflops_dense
    seconds = time.perf_counter() - t0
    right = [normalize(a) == normalize(r["answer"]) for a, r in zip(answers, records)]
    types = sorted({r["type"] for r in records})
    per_type = {t: sum(ok for ok, r in zip(right, records) if r["type"] == t) / sum(r["type"] == t for r in records) for t in types}
    n = len(records)
    return EvalResult(desc, sum(right) / n, per_type, n, seconds, fl / n, fl_dense / n, kv / n, kv_dense / n, answers)
