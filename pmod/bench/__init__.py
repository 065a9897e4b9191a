"""`pmod bench`: dense vs p-MoD on the same weights, in one run, against transformers where it has a twin.

    pmod bench [--preset cpu|gpu-7b|tiny] [--device cpu|cuda] [--output DIR] [--quick] [--threads N]
    python -m pmod.bench ...                       (the same, without the console script)

What is measured (every ratio is computed inside the run, from repetitions interleaved across the compared
models so that drift hits them alike; median and min over `reps` after `warmup` runs; fixed seeds;
`torch.inference_mode`; on CUDA each call is bracketed by CUDA events after a synchronize):

* prefill: generation's prefill, `model(ids, images, use_cache=True, logits_to_keep='last')` (vision tower,
  projector, layout, decoder writing the KV cache, lm_head on the last token) for the dense model and p-MoD
  models with the same weights, at LLaVA-1.5 (1 image, 576 tokens) and LLaVA-NeXT (5 images, 2880 tokens)
  counts; ideal speed-up = dense FLOPs / p-MoD FLOPs (`pmod.flops`, complete convention, vision stand-in and
  projector included, lm_head on the last token). The vision tower is a 2-layer 64-wide CLIP stand-in at
  336 px / 14 (576 tokens per image), counted in the FLOPs, so the LLM dominates as in LLaVA.
* decode: `steps` greedy `decode_step`s at batch 1 and 8 over a prefilled cache (eos plays no part);
  tokens/s = B * steps / time; the batch-8 cache is 8 copies of one prefilled row (decode cost depends on
  lengths only). KV bytes are read from the cache (`PmodCache.nbytes`), text included and vision only.
* against transformers: our decoder vs `LlamaModel` prefill (same inputs_embeds, SDPA; at the preset's
  `hf_images` prompt sizes, default all; `--quick` on the cpu preset: 576 tokens only); our
  `pmod.generate.generate` vs `LlamaForCausalLM.generate(min_new_tokens=n)` at batch 1, per decode step as
  (stamp of the n-th new token - stamp of the 1st) / (n - 1), stamped by a streamer, so each side's own
  prefill is excluded (a 634-token text prompt: LLaVA-1.5's length).
* batching: 8 text prompts of unequal length generated as one batch vs one by one (tokens compared).
* packing: a batch with unequal image counts through our packed decoder vs padded execution of the same
  weights: our decoder on rows filled to equal length (exact on real tokens: right fill under a causal mask)
  and `LlamaModel` over right-padded inputs_embeds with an attention mask.

p-MoD models are the dense model's modules plus routers ~ N(0, router_std) (bias 0), so routing is
non-trivial (checked: kept tokens are not the first k). Weights are random (LLaMA init, std 0.02), built
on the target device; nothing is downloaded. Outputs in --output: results.json, results.md, speedup.png;
the last stdout line is one JSON object. Peak memory: CUDA max_memory_allocated above the pre-call
allocation; CPU peak RSS growth (VmHWM reset through /proc/self/clear_refs), a lower bound because the
allocator reuses memory it already holds. CPU timings are only as clean as the machine is idle: the run records
the load average and, per section, the share of CPU time other processes took (with 2 threads, a busy machine
stalls every parallel op; prefer --threads 1 there and read the ratios, not the absolute times).
Legend: B rows, L layers, P tokens per image, n_v vision tokens per row, n_t text tokens per row.

Modules: `presets` (shapes), `models` (dense, p-MoD twins, the transformers twin), `calls` (prompts and the
timed calls), `timing` (repetitions, memory, machine state), `section_*` (one module per section, registering
itself; `section_kernels` and `section_train` are extras, run when --sections names them), `sections` (their
imports, in run order), `train_step` (the training step, also `python -m pmod.bench.train_step`),
`report` (the bars, markdown, plot), `registry` (what a section is: a new one registers there and runs with the
rest), `cli` (the run and its command line). Every section's results are written (results.json, results.md and, after
prefill, speedup.png; each atomically) as soon as it ends: a stopped run keeps what it measured, with
`meta.finished` naming the finished sections and `meta.complete` false. One tqdm bar per section on stderr.
"""
from __future__ import annotations

from pmod.bench.calls import Prompt, decode_loop, make_prompt, prefill, replicate_rows
from pmod.bench.cli import add_parser, main, run, run_benchmark
from pmod.bench.models import build_dense, hf_llama, with_routers
from pmod.bench.presets import PRESETS, Preset, resolve_preset, schedules
from pmod.bench.registry import BenchContext, Section, get_section, register_section, section_names
from pmod.bench.report import evaluate_checks, plot_speedup, write_markdown
from pmod.bench.sections import (
    StepClock,
    bench_batching,
    bench_decode,
    bench_hf_decode,
    bench_hf_prefill,
    bench_packing,
    bench_prefill,
    floor_step,
    ideal_curve,
)
from pmod.bench.timing import Timing, machine_info, time_interleaved

SECTIONS = tuple(n for n in section_names() if get_section(n).default)  # the built-in default run, in order
EXTRAS = tuple(n for n in section_names() if not get_section(n).default)  # built-in, run when --sections names them

__all__ = [
    "PRESETS",
    "EXTRAS",
    "SECTIONS",
    "BenchContext",
    "Preset",
    "Prompt",
    "Section",
    "StepClock",
    "Timing",
    "add_parser",
    "bench_batching",
    "bench_decode",
    "bench_hf_decode",
    "bench_hf_prefill",
    "bench_packing",
    "bench_prefill",
    "build_dense",
    "decode_loop",
    "evaluate_checks",
    "floor_step",
    "get_section",
    "hf_llama",
    "ideal_curve",
    "machine_info",
    "main",
    "make_prompt",
    "plot_speedup",
    "prefill",
    "register_section",
    "replicate_rows",
    "resolve_preset",
    "run",
    "run_benchmark",
    "schedules",
    "section_names",
    "time_interleaved",
    "with_routers",
    "write_markdown",
]
