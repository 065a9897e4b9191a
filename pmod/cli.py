"""The `pmod` command: one entry point, one sub-command per job (`pmod <cmd> --help`).

Each sub-command lives in its own module with an `add_parser(sub)` that registers it; `COMMANDS` lists them in
`pmod --help` order. A new command is one module and one line here. A listed module missing from this install is
left out of the parser; any other import error is raised.
"""
from __future__ import annotations

import argparse
import importlib
import sys

__all__ = ["COMMANDS", "build_parser", "main"]

COMMANDS = (  # (name, module with add_parser(sub))
    ("generate", "pmod.tools.generate"),
    ("chat", "pmod.tools.chat"),
    ("flops", "pmod.tools.flops_cli"),
    ("train", "pmod.training.cli"),
    ("eval", "pmod.evaluation.cli"),
    ("bench", "pmod.bench"),
    ("demo", "pmod.tools.demo"),
    ("compare-strategies", "pmod.tools.compare"),
    ("serve", "pmod.serve.cli"),
    ("compare-methods", "pmod.tools.compare_methods"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pmod", description="p-MoD multimodal models: run, train, evaluate, measure")
    sub = parser.add_subparsers(dest="cmd", required=True)
    for _name, module in COMMANDS:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name and not module.startswith(e.name):
                raise
            continue
        mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args) or 0
    except (ValueError, FileNotFoundError, NotADirectoryError, KeyError) as e:
        print(f"pmod {args.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
