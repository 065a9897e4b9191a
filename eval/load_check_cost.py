"""What the NaN/Inf check of `from_pretrained` costs: load time with `check_finite` on vs off, interleaved.

    python eval/load_check_cost.py [--model pmod/assets/tiny-synth-pmod] [--rounds 30] [--slab-mb 512]

Rounds alternate on / off (the order flipped every round), each a full `pmod.from_pretrained` in this process
after one warm-up of each; the figure is the median of the per-round ratios on / off (paired, so drifts of a
shared machine cancel). `--slab-mb` also times the check alone over a bf16 slab of that size against the cast
copy every load does anyway (`.to(float32)`), to show how it scales past a 1.4 M-parameter model. The last line
is JSON.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import pmod
from pmod.io.files import check_finite

REPO = Path(__file__).resolve().parents[1]


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(REPO / "pmod" / "assets" / "tiny-synth-pmod"))
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--slab-mb", type=int, default=512)
    args = p.parse_args()
    torch.set_num_threads(1)
    load = {flag: (lambda flag=flag: pmod.from_pretrained(args.model, check_finite=flag)) for flag in (True, False)}
    for fn in load.values():  # warm-up: imports, first allocations
        fn()
    on, off = [], []
    for r in range(args.rounds):
        order = (True, False) if r % 2 == 0 else (False, True)
        got = {flag: _time(load[flag]) for flag in order}
        on.append(got[True])
        off.append(got[False])
    ratios = [a / b for a, b in zip(on, off)]
    from safetensors.torch import load_file

    tensors = load_file(str(Path(args.model) / "model.safetensors"))  # the check alone, on the model's own tensors
    alone = min(_time(lambda: [check_finite(k, v, "bench") for k, v in tensors.items()]) for _ in range(20))
    res = {"model": args.model, "rounds": args.rounds, "median_on_s": statistics.median(on), "median_off_s": statistics.median(off),
           "median_ratio": statistics.median(ratios), "ratio_q1_q3": statistics.quantiles(ratios, n=4)[::2],
           "tensors": len(tensors), "check_alone_s": alone}
    if args.slab_mb:
        slab = torch.randn(args.slab_mb * 2**20 // 2, dtype=torch.float32).to(torch.bfloat16)  # bf16: 2 bytes each
        cast = [_time(lambda: slab.to(torch.float32)) for _ in range(5)]
        check = [_time(lambda: check_finite("slab", slab, "bench")) for _ in range(5)]
        res.update(slab_mb=args.slab_mb, slab_cast_s=min(cast), slab_check_s=min(check),
                   slab_check_gb_s=args.slab_mb / 1024 / min(check), slab_check_vs_cast=min(check) / min(cast))
    print(f"from_pretrained({Path(args.model).name}): check_finite on {res['median_on_s'] * 1e3:.1f} ms, off "
          f"{res['median_off_s'] * 1e3:.1f} ms; paired ratio {res['median_ratio']:.4f} (quartiles "
          f"{res['ratio_q1_q3'][0]:.4f}-{res['ratio_q1_q3'][1]:.4f}) over {args.rounds} rounds; the check alone over its "
          f"{len(tensors)} tensors {alone * 1e3:.2f} ms ({alone / res['median_off_s'] * 100:.1f} % of a load)")
    if args.slab_mb:
        print(f"check alone over a {args.slab_mb} MB bf16 slab: {res['slab_check_s'] * 1e3:.1f} ms "
              f"({res['slab_check_gb_s']:.2f} GB/s), {res['slab_check_vs_cast']:.2f}x the cast copy a load makes anyway")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
