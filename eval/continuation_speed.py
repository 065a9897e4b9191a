"""Continuing from a cache vs prefilling again: a chat's second turn, and several questions about one image.

    PYTHONPATH=. python eval/continuation_speed.py --preset cpu --device cpu --rounds 3

CPU bench shape (`pmod bench --preset cpu`: 32 layers, hidden 512, float32, 576 vision tokens, random weights),
dense and p-MoD (PRD schedule) on the same weights. Paired, interleaved rounds (the order of the compared calls
flips every round); each figure is the median over rounds, each ratio the median of per-round ratios.

1. Chat: turn 1 prefills [BOS, 28 text, image, 29 text] and decodes a 16-token answer; turn 2 is 21 new tokens
   (the answer's last token, then "USER: ... ASSISTANT:"). Timed: turn 1's prefill; turn 2's prefill continuing
   (a copy of) the cache; turn 2's prefill from scratch (the whole conversation again, as `pmod chat` did before);
   one decode step on the same cache (the floor of any forward at batch 1: one pass over the weights).
2. Questions: 6 questions (29 tokens each) about one image, answered with N new tokens each: 6 independent
   `generate` calls on the whole prompt vs one prefix prefill + 6 `generate` calls continuing copies of it; and
   as batches: the 6 questions as one batch of 6 rows over the prefix's cache replicated, vs the 6 whole prompts
   as one batch.
The last stdout line is JSON.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from pmod.bench.calls import replicate_rows
from pmod.bench.models import build_dense, with_routers
from pmod.bench.presets import resolve_preset
from pmod.config import ModConfig
from pmod.packing import IMAGE_TOKEN_INDEX as IMG


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _paired(calls: dict, rounds: int) -> dict[str, list[float]]:
    """Each round runs every call once, in an order that flips every round; seconds per call per round."""
    out = {k: [] for k in calls}
    names = list(calls)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            out[name].append(_timed(calls[name]))
    return out


def _ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b))


def chat(model, V: int, pix, rounds: int) -> dict:
    g = torch.Generator().manual_seed(1)
    rand = lambda n: torch.randint(3, V, (n,), generator=g).tolist()  # noqa: E731
    turn1 = [1] + rand(28) + [IMG] + rand(29)
    with torch.inference_mode():
        answer, cache = model.generate(input_ids=torch.tensor([turn1]), images=pix, max_new_tokens=16, eos_token_id=[],
                                       return_cache=True)
    chunk = [int(answer[0, -1])] + rand(20)
    whole = turn1 + answer[0, :-1].tolist() + chunk
    copies = iter([cache.copy() for _ in range(rounds + 1)])  # made before timing: a chat continues its own cache
    with torch.inference_mode():
        first = lambda: model(input_ids=torch.tensor([turn1]), images=pix, use_cache=True, logits_to_keep="last",  # noqa: E731
                              output_routing=False)
        cont = lambda: model(input_ids=torch.tensor([chunk]), past_key_values=next(copies), logits_to_keep="last",  # noqa: E731
                             output_routing=False)
        again = lambda: model(input_ids=torch.tensor([whole]), images=pix, use_cache=True, logits_to_keep="last",  # noqa: E731
                              output_routing=False)
        steps = iter([cache.copy() for _ in range(rounds + 1)])
        step = lambda: model.decode_step(answer[0, -1:], next(steps))  # noqa: E731  (one pass over the weights)
        cont(), first(), again(), step()  # warm-up
        t = _paired({"turn1": first, "turn2_cached": cont, "turn2_scratch": again, "decode_step": step}, rounds)
    return {"turn1_prefill_ms": 1e3 * statistics.median(t["turn1"]),
            "turn2_cached_ms": 1e3 * statistics.median(t["turn2_cached"]),
            "turn2_scratch_ms": 1e3 * statistics.median(t["turn2_scratch"]),
            "turn2_cached_over_turn1": _ratio(t["turn2_cached"], t["turn1"]),
            "turn2_scratch_over_cached": _ratio(t["turn2_scratch"], t["turn2_cached"]),
            "decode_step_ms": 1e3 * statistics.median(t["decode_step"]),
            "new_tokens": len(chunk), "turn1_tokens": len(turn1) - 1 + model.config.vision.num_patches, "layer_lengths": cache.layer_lengths()}


def questions(model, V: int, pix, rounds: int, new_tokens: int, n_questions: int = 6) -> dict:
    g = torch.Generator().manual_seed(2)
    rand = lambda n: torch.randint(3, V, (n,), generator=g).tolist()  # noqa: E731
    prefix = [1] + rand(28) + [IMG]
    qs = [rand(29) for _ in range(n_questions)]
    gen = dict(max_new_tokens=new_tokens, eos_token_id=[])

    def independent():
        return [model.generate(input_ids=torch.tensor([prefix + q]), images=pix, **gen) for q in qs]

    def cached():
        with torch.inference_mode():
            base = model(input_ids=torch.tensor([prefix]), images=pix, use_cache=True, logits_to_keep="none",
                         output_routing=False).past_key_values
        return [model.generate(input_ids=torch.tensor([q]), past_key_values=base.copy(spare=len(q) + new_tokens), **gen)
                for q in qs]

    def cached_batch():  # the questions as one batch of rows over the prefix, replicated (an engine's prefix cache)
        with torch.inference_mode():
            base = model(input_ids=torch.tensor([prefix]), images=pix, use_cache=True, logits_to_keep="none",
                         output_routing=False).past_key_values
        rows = replicate_rows(base.copy(spare=29 + new_tokens), n_questions)
        return list(model.generate(input_ids=torch.tensor(qs), past_key_values=rows, **gen).unbind(0))

    def independent_batch():  # the 6 whole prompts as one batch
        return list(model.generate(input_ids=torch.tensor([prefix + q for q in qs]), images=pix.expand(n_questions, -1, -1, -1),
                                   **gen).unbind(0))

    ref = independent()  # also the warm-up
    same = all(all(torch.equal(a[0], b.view(-1)) for a, b in zip(ref, f())) for f in (cached, cached_batch, independent_batch))
    t = _paired({"independent": independent, "cached": cached, "independent_batch": independent_batch,
                 "cached_batch": cached_batch}, rounds)
    med = {k: statistics.median(v) for k, v in t.items()}
    return {"new_tokens": new_tokens, "questions": n_questions, **{f"{k}_s": v for k, v in med.items()},
            "speedup": _ratio(t["independent"], t["cached"]), "speedup_batched": _ratio(t["independent"], t["cached_batch"]),
            "speedup_batch_vs_batch": _ratio(t["independent_batch"], t["cached_batch"]), "same_tokens": same}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, nargs="+", default=[1, 8], help="answer lengths of the questions")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on the shared 2-core machine a second thread makes every op wait ~10 ms)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    p = resolve_preset(args.preset)
    dense = build_dense(p, args.device)
    models = {"dense": dense, "p-MoD": with_routers(dense, ModConfig(), p.router_std)}
    S, V = dense.config.vision.image_size, dense.config.text.vocab_size
    pix = torch.randn(1, 3, S, S, generator=torch.Generator().manual_seed(0)).to(args.device, p.dtype)
    report = {"preset": p.name, "device": args.device, "threads": torch.get_num_threads(), "rounds": args.rounds}
    for name, m in models.items():
        c = chat(m, V, pix, args.rounds)
        print(f"{name:6s} chat: turn 1 prefill {c['turn1_prefill_ms']:.1f} ms ({c['turn1_tokens']} tokens), turn 2 "
              f"continuing {c['turn2_cached_ms']:.1f} ms ({c['new_tokens']} tokens) = {c['turn2_cached_over_turn1']:.1%} "
              f"of turn 1; turn 2 from scratch {c['turn2_scratch_ms']:.1f} ms ({c['turn2_scratch_over_cached']:.1f}x); "
              f"one decode step {c['decode_step_ms']:.1f} ms", flush=True)
        q = [questions(m, V, pix, args.rounds, n) for n in args.new_tokens]
        for r in q:
            print(f"{name:6s} 6 questions, {r['new_tokens']:2d} new tokens each: independent {r['independent_s']:.2f} s, "
                  f"one cached prefix {r['cached_s']:.2f} s = {r['speedup']:.2f}x; as one batch of 6 over the cached prefix "
                  f"{r['cached_batch_s']:.2f} s = {r['speedup_batched']:.2f}x (vs the 6 prompts as one batch "
                  f"{r['independent_batch_s']:.2f} s: {r['speedup_batch_vs_batch']:.2f}x); same tokens: {r['same_tokens']}",
                  flush=True)
        report[name] = {"chat": c, "questions": q}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
