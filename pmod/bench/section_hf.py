"""Bench sections `hf_prefill` and `hf_decode`: our decoder and generate against transformers' on the same weights."""
from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

from pmod.bench import report
from pmod.bench.calls import _decoder, make_prompt
from pmod.bench.presets import Preset
from pmod.bench.registry import Section, register_section
from pmod.bench.timing import Timing, time_interleaved
from pmod.cache import PmodCache
from pmod.generate import generate

__all__ = ["StepClock", "bench_hf_decode", "bench_hf_prefill", "floor_step", "hf_hidden"]


def hf_hidden(hf, embeds: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """`LlamaModel` over embeds [B, T, C] (mask [B, T] or None), no cache: last hidden states (B = 1: [T, C])."""
    h = hf.model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state
    return h[0] if h.shape[0] == 1 and mask is None else h


def bench_hf_prefill(dense, hf, preset: Preset, device: str, warmup: int, reps: int) -> list[dict]:
    """Our decoder vs `transformers.LlamaModel` on the same inputs_embeds (batch 1, no cache), with parity."""
    rows = []
    for k in preset.hf_images or preset.images:
        prompt = make_prompt(dense.config, [k], preset.n_text, device, seed=k)
        x, layout = dense.prepare(prompt.input_ids, prompt.images)
        fns = {"ours": partial(_decoder, dense, x, layout), "hf": partial(hf_hidden, hf, x[None], None)}
        t = time_interleaved(fns, device, warmup, reps)
        rows.append({
            "n_tokens": x.shape[0], "ours": t["ours"].summary(), "hf": t["hf"].summary(),
            "ratio_median": t["ours"].median_ms / t["hf"].median_ms, "ratio_min": t["ours"].min_ms / t["hf"].min_ms,
            "max_abs_diff": (t["ours"].result.float() - t["hf"].result.float()).abs().max().item(),
        })
    return rows


class StepClock:
    """A generate streamer (transformers' protocol, which both generates follow) that timestamps every new token:
    the first `put` is the prompt, skipped. On CUDA it synchronises first, so a stamp marks a token that exists."""

    def __init__(self, device: str):
        self.cuda, self.skip, self.stamps = device.startswith("cuda"), True, []

    def put(self, value) -> None:
        if self.skip:
            self.skip = False
            return
        if self.cuda:
            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass

    @property
    def step_ms(self) -> float:
        """Mean ms between the first and the last new token: one decode step each, prefill excluded."""
        return (self.stamps[-1] - self.stamps[0]) * 1e3 / (len(self.stamps) - 1)


def floor_step(model, cache: PmodCache) -> Callable[[], torch.Tensor]:
    """The work no batch-1 decode step can skip: every weight matrix times one token (GEMV) and attention over
    each layer's cache, back to back, with no norms, RoPE, residuals, cache writes or sampling. At small
    shapes a step is bound by reading the weights and the cache from memory; this is that floor, and the time
    above it is an implementation's own overhead."""
    lm, C = model.language_model, model.config.text.hidden_size
    x = torch.randn(1, C, device=model.device, dtype=model.dtype)
    kv = [cache.layer_kv(i) for i in range(cache.num_layers)]  # [1, S, G, D] views

    def step() -> torch.Tensor:
        for layer, (k, v) in zip(lm.layers, kv):
            a, m = layer.self_attn, layer.mlp
            q = F.linear(x, a.q_proj.weight).view(1, a.H, 1, a.D)
            F.linear(x, a.k_proj.weight), F.linear(x, a.v_proj.weight)
            o = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2), enable_gqa=a.H != a.G)
            F.linear(o.reshape(1, -1), a.o_proj.weight)
            hid = F.linear(x, m.gate_proj.weight) * F.linear(x, m.up_proj.weight)
            F.linear(hid, m.down_proj.weight)
        return F.linear(x, model.lm_head.weight)

    return step


def bench_hf_decode(dense, hf, preset: Preset, device: str, warmup: int, reps: int) -> dict:
    """Per decode step at batch 1, `pmod.generate.generate` vs HF `generate(min_new_tokens=n)`: the time between
    the first and the n-th new token over n - 1, stamped by a streamer, so each side's own prefill is excluded."""
    n = preset.hf_new_tokens
    L = preset.n_text + preset.images[0] * dense.config.vision.num_patches  # a text prompt as long as LLaVA-1.5's
    ids = make_prompt(dense.config, [0], L, "cpu", seed=7).input_ids
    ids_dev, pad = ids.to(dense.device), dense.config.text.pad_token_id or 0
    graphs = device.startswith("cuda")  # the host-bound regime: CUDA graphs as a third contender
    steps: dict[str, list[float]] = {"ours": [], "hf": [], **({"ours_graph": []} if graphs else {})}

    def ours(graph: bool = False):
        clock = StepClock(device)
        out = generate(dense, ids, max_new_tokens=n, eos_token_id=[], streamer=clock, cuda_graph=graph)
        steps["ours_graph" if graph else "ours"].append(clock.step_ms)
        return out

    def theirs():
        clock = StepClock(device)
        out = hf.generate(ids_dev, attention_mask=torch.ones_like(ids_dev), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, pad_token_id=pad, streamer=clock)[:, ids.shape[1]:]
        steps["hf"].append(clock.step_ms)
        return out

    with torch.inference_mode():
        cache = dense(input_ids=ids_dev, use_cache=True, logits_to_keep="last", output_routing=False).past_key_values
        floor = floor_step(dense, cache)
        fns = {"ours": ours, "hf": theirs, "floor": floor, **({"ours_graph": partial(ours, True)} if graphs else {})}
        t = time_interleaved(fns, device, warmup, reps)
    per = {k: Timing(times_ms=v[-reps:]) for k, v in steps.items()}  # the timed repetitions only
    a, b = t["ours"].result.cpu(), t["hf"].result.cpu()
    fl = t["floor"].median_ms
    extra = {}
    if graphs:
        g = per["ours_graph"]
        extra = {"ours_graph_step": g.summary(), "ours_graph_step_ms": g.median_ms, "graph_step_ratio": g.median_ms / per["hf"].median_ms,
                 "graph_tokens_match": float(torch.equal(t["ours_graph"].result.cpu(), a))}
    return {**extra,
        "floor_step_ms": fl, "ours_overhead_ms": per["ours"].median_ms - fl, "hf_overhead_ms": per["hf"].median_ms - fl,
        "overhead_ratio": (per["ours"].median_ms - fl) / max(per["hf"].median_ms - fl, 1e-9),
        "prompt_tokens": ids.shape[1], "new_tokens": n, "ours_generate": t["ours"].summary(),
        "hf_generate": t["hf"].summary(), "ours_step": per["ours"].summary(), "hf_step": per["hf"].summary(),
        "ours_step_ms": per["ours"].median_ms, "hf_step_ms": per["hf"].median_ms,
        "step_ratio": per["ours"].median_ms / per["hf"].median_ms,
        "step_ratio_min": per["ours"].min_ms / per["hf"].min_ms,
        "tokens_match": float((a == b).float().mean()) if a.shape == b.shape else 0.0,
    }


# calls: what the section hands `time_interleaved` (callables x rounds), the length of its progress bar
register_section(Section("hf_prefill", lambda c: bench_hf_prefill(c.dense, c.hf, c.preset, c.device, c.warmup, c.reps),
                         lambda c: c.rounds * 2 * len(c.preset.hf_images or c.preset.images), report.md_hf_prefill,
                         needs_hf=True))
register_section(Section("hf_decode", lambda c: bench_hf_decode(c.dense, c.hf, c.preset, c.device, c.warmup, c.reps),
                         lambda c: c.rounds * (4 if c.device.startswith("cuda") else 3), report.md_hf_decode,
                         needs_hf=True))
