"""Bench sections `batching` (prompts of unequal length as one batch vs one by one) and `packing` (a batch with
unequal image counts, packed vs padded, ours and transformers')."""
from __future__ import annotations

from functools import partial

import torch

from pmod.bench import report
from pmod.bench.calls import _decoder, make_prompt
from pmod.bench.presets import Preset
from pmod.bench.registry import Section, register_section
from pmod.bench.section_hf import hf_hidden
from pmod.bench.timing import time_interleaved
from pmod.generate import generate

__all__ = ["bench_batching", "bench_packing"]


def bench_batching(dense, preset: Preset, device: str, warmup: int, reps: int) -> dict:
    """`preset.batch_prompts` text prompts of unequal length: one batched `generate` vs one call per prompt."""
    lo, hi, B = preset.batch_text[0], preset.batch_text[1], preset.batch_prompts
    lens = [lo + (hi - lo) * i // max(B - 1, 1) for i in range(B)]
    p = make_prompt(dense.config, [0] * B, lens, "cpu", seed=11)
    n = preset.batch_new_tokens
    gen = partial(generate, dense, max_new_tokens=n, eos_token_id=[])
    one = lambda: torch.cat([gen(p.input_ids[b : b + 1, : lens[b]]) for b in range(B)])
    t = time_interleaved({"batched": lambda: gen(p.input_ids, attention_mask=p.attention_mask), "one_by_one": one},
                         device, warmup, reps)
    return {
        "prompts": B, "prompt_lens": lens, "new_tokens": n, "batched": t["batched"].summary(),
        "one_by_one": t["one_by_one"].summary(), "speedup_median": t["one_by_one"].median_ms / t["batched"].median_ms,
        "speedup_min": t["one_by_one"].min_ms / t["batched"].min_ms,
        "tokens_equal": bool(torch.equal(t["batched"].result.cpu(), t["one_by_one"].result.cpu())),
    }


def bench_packing(dense, pmod, hf, preset: Preset, device: str, warmup: int, reps: int) -> list[dict]:
    """Decoder over a batch with unequal image counts: packed (ours) vs padded (ours filled; HF masked)."""
    cfg, rows = dense.config, []
    packed = make_prompt(cfg, preset.packed_images, preset.n_text, device, seed=3)
    filled = make_prompt(cfg, preset.packed_images, preset.n_text, device, seed=3, fill=True)
    x, layout = dense.prepare(packed.input_ids, packed.images, None, packed.attention_mask)
    xf, layout_f = dense.prepare(filled.input_ids, filled.images, None, filled.attention_mask)
    real = layout.merged_mask()  # [B, M]
    for name, model in (("dense", dense), ("prd", pmod)):
        fns = {"packed": partial(_decoder, model, x, layout), "padded_ours": partial(_decoder, model, xf, layout_f)}
        if name == "dense":
            fns["padded_hf"] = partial(hf_hidden, hf, layout.pad(x), real.long())  # [B, M, C], [B, M]
        t = time_interleaved(fns, device, warmup, reps)
        ref = t["packed"].result.float()
        row = {"model": name, "images_per_row": list(preset.packed_images), "row_tokens": packed.merged_lens,
               "packed_tokens": x.shape[0], "padded_tokens": xf.shape[0], "packed": t["packed"].summary()}
        for v in [k for k in fns if k != "packed"]:
            out = t[v].result.float()
            out = out.view(*real.shape, -1)[real] if v == "padded_ours" else out[real]
            row[v] = {**t[v].summary(), "speedup_median": t[v].median_ms / t["packed"].median_ms,
                      "speedup_min": t[v].min_ms / t["packed"].min_ms, "max_abs_diff": (out - ref).abs().max().item()}
        rows.append(row)
    return rows


# calls: what the section hands `time_interleaved` (callables x rounds), the length of its progress bar
register_section(Section("batching", lambda c: bench_batching(c.dense, c.preset, c.device, c.warmup, c.reps),
                         lambda c: c.rounds * 2, report.md_batching))
register_section(Section("packing",
                         lambda c: bench_packing(c.dense, c.pmod, c.hf, c.preset, c.device, c.warmup, c.reps),
                         lambda c: c.rounds * 5, report.md_packing, needs_hf=True))
