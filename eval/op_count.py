"""Deterministic host-op counts of one call: top-level operators a MoD layer adds to a prefill, and per decode step.

    python eval/op_count.py            # hidden 64, 32 layers, 576 vision + 58 text tokens, CPU; ~20 s

See `pmod.bench.opcount`: the counts do not depend on the machine or the timing (issue 22's host-cost bars).
"""
from __future__ import annotations

import argparse
import json

from pmod.bench.opcount import op_counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--images", type=int, default=1, help="images of 576 tokens in the prompt")
    args = ap.parse_args()
    print(json.dumps(op_counts(args.layers, args.images), indent=1))


if __name__ == "__main__":
    main()
