"""`python -m pmod.training ...` = `pmod train ...` (usable under `accelerate launch -m pmod.training`)."""
from __future__ import annotations

import argparse
import sys

from pmod.training.cli import add_arguments, run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pmod.training", description="Train a LLaVA-style p-MoD model (= pmod train).")
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return run(args)
    except (ValueError, FileNotFoundError, NotADirectoryError, KeyError) as e:
        print(f"pmod train: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
