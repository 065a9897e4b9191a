"""What full logits cost over none: the head alone and (--forward) the whole forward, in paired rounds.

    python eval/logits_cost.py [--threads 2] [--rounds 7] [--forward]

Head: h [N, 512] -> logits over a 32000 vocab, float32, at 2880 + 64 tokens (batch 1) and at a left-padded batch
of 8 unequal rows (400..1100 tokens). Contenders per round, interleaved: `gemm` (torch.mm into a fresh [N, V],
the floor), `new` (`pmod.modeling.head.logits_all`), `old` (GEMM, cast, `Layout.pad`: the path it replaced).
Ratios are medians of per-round ratios to `gemm`. --forward adds the bench's cpu-preset p-MoD model (hidden 512,
32 layers) at 2880 + 64: forward with logits_to_keep "all" vs "none", (all - none) / gemm per round.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from pmod.modeling.head import logits_all
from pmod.packing import build_layout


def _layout(lens: list[int]):
    T = max(lens)
    ids = torch.randint(3, 32000, (len(lens), T), generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(len(lens), T, dtype=torch.long)
    for b, n in enumerate(lens):
        mask[b, T - n :] = 1  # left padding, as generation and lmms-eval pad
    return build_layout(ids, mask, [], "cpu")


def _clock(fn) -> float:
    t0 = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t0
    del out
    return dt * 1e3


def paired(fns: dict, rounds: int) -> dict:
    """Interleaved rounds (order rotated each round); first round is warm-up. Returns times_ms per name."""
    names, times = list(fns), {n: [] for n in fns}
    for r in range(rounds + 1):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            t = _clock(fns[n])
            if r:
                times[n].append(t)
    return times


def head_case(lens: list[int], rounds: int, C: int = 512, V: int = 32000) -> dict:
    layout = _layout(lens)
    g = torch.Generator().manual_seed(1)
    h = torch.randn(layout.num_tokens, C, generator=g)
    lm_head = torch.nn.Linear(C, V, bias=False)
    w = lm_head.weight
    with torch.inference_mode():
        fns = {"gemm": lambda: torch.mm(h, w.t()), "new": lambda: logits_all(lm_head, h, layout),
               "old": lambda: layout.pad(lm_head(h).float())}
        assert torch.equal(fns["new"](), fns["old"]())  # the same numbers (fp32), or the timing means nothing
        t = paired(fns, rounds)
    ratio = lambda a: statistics.median(x / y for x, y in zip(t[a], t["gemm"]))  # noqa: E731
    return {"rows": len(lens), "tokens": layout.num_tokens, "padded_slots": layout.batch_size * layout.merged_len,
            **{f"{n}_ms": statistics.median(v) for n, v in t.items()}, "new_over_gemm": ratio("new"),
            "old_over_gemm": ratio("old")}


def forward_case(rounds: int) -> dict:
    from pmod.bench import build_dense, make_prompt, resolve_preset, schedules, with_routers

    preset = resolve_preset("cpu")
    with torch.no_grad():
        dense = build_dense(preset, "cpu", attn_backend="sdpa")
        model = with_routers(dense, schedules(preset)["prd"], preset.router_std, 1)
    p = make_prompt(model.config, [5], 64, "cpu", seed=5)
    call = lambda keep: lambda: model(input_ids=p.input_ids, images=p.images, logits_to_keep=keep, output_routing=False)  # noqa: E731
    with torch.inference_mode():
        x, _ = model.prepare(p.input_ids, p.images)
        h = torch.randn(x.shape[0], x.shape[1])
        w = model.lm_head.weight
        t = paired({"all": call("all"), "none": call("none"), "gemm": lambda: torch.mm(h, w.t())}, rounds)
    extra = [(a - n) / g for a, n, g in zip(t["all"], t["none"], t["gemm"])]
    return {"tokens": x.shape[0], **{f"{n}_ms": statistics.median(v) for n, v in t.items()},
            "all_minus_none_over_gemm": statistics.median(extra), "per_round": extra}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--forward", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    res = {"threads": args.threads, "rounds": args.rounds,
           "batch1_2944": head_case([2944], args.rounds),
           "batch8_left_padded": head_case([400 + 100 * i for i in range(8)], args.rounds)}
    if args.forward:
        res["forward_pmod_2880_64"] = forward_case(max(3, args.rounds // 2))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
