"""`pmod eval`: the paper's 14 lmms-eval benchmarks (or any subset) for one checkpoint, or two side by side.

    pmod eval --model PATH [--compare DENSE_PATH] [--tasks mme,gqa] [--output DIR] [--limit N] [--batch-size N]
    pmod eval --tasks pmod_synth [--synth-data DIR]    # our local synthetic task on the embedded default, offline

--model defaults to the embedded p-MoD default (pmod/assets/tiny-synth-pmod, trained on pmod_synth's questions); the
pmod_synth task ships with pmod and, without --synth-data, reads a dataset written into DIR/pmod_synth-data.

Writes DIR/results.{md,json,png} (each benchmark's score beside prefill TFLOPs, kept-token ratio and KV bytes vs
the dense twin) and, per model, lmms-eval's own outputs in DIR/<label>/. Run the same command again to continue
an interrupted evaluation: finished requests are read back from the plugin's journal, not recomputed.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from pmod.evaluation.tasks import PAPER_TASKS

__all__ = ["add_parser", "cmd_eval"]


def _quiet_lmms_eval_logs() -> None:
    """lmms-eval logs through loguru, whose default handler prints DEBUG lines (hundreds while indexing tasks) in
    our process; keep warnings. Its own subprocess configures itself from --verbosity."""
    import sys

    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level="WARNING")


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("eval", help="lmms-eval benchmarks (default: the paper's 14) with cost columns",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None,
                   help="checkpoint folder or hub id (anything pmod.from_pretrained loads); default: the embedded "
                        "p-MoD default, which knows pmod_synth only")
    p.add_argument("--compare", help="a second checkpoint, e.g. the dense baseline, evaluated and shown beside")
    p.add_argument("--labels", help="column names for --model[,--compare] (default: the folder names)")
    p.add_argument("--tasks", default=",".join(PAPER_TASKS), help="comma-separated lmms-eval tasks (default: the paper's 14)")
    p.add_argument("--output", default="out/eval", help="output folder (default: out/eval)")
    p.add_argument("--limit", type=float, help="samples per task (testing only: scores are then not the paper's)")
    p.add_argument("--batch-size", type=int, default=1, help="requests per forward pass (the paper ran batch 1)")
    p.add_argument("--num-processes", type=int, default=1, help="data-parallel processes via accelerate launch")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (the checkpoint's)")
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda if available; one GPU per process if several)")
    p.add_argument("--attn-backend", default="auto", choices=["auto", "sdpa", "flash", "eager"])
    p.add_argument("--conv-template", help="conversation template (default: the checkpoint's, vicuna_v1 for p-MoD)")
    p.add_argument("--prefix-cache-mb", type=float, default=None,
                   help="keep prompt prefixes (up to the image) in an LRU of this many MiB: a question about an image "
                        "already seen continues its cached prefill (requests then run one at a time)")
    p.add_argument("--include-path", action="append", type=Path, help="extra lmms-eval task folder (repeatable)")
    p.add_argument("--synth-data", type=Path, help="dataset folder for the pmod_synth task (test.jsonl + images/)")
    p.add_argument("--online", action="store_true", help="let lmms-eval download datasets (default: local cache only)")
    p.add_argument("--no-check", action="store_true", help="skip the check that every dataset is cached locally")
    p.add_argument("--table-only", action="store_true", help="rebuild the table from an earlier run's outputs")
    p.add_argument("--quiet", action="store_true", help="do not echo lmms-eval's output (it is always logged)")
    p.set_defaults(fn=cmd_eval)
    return p


def _check_models(paths: list[str], offline: bool) -> None:
    """Every checkpoint must be found before lmms-eval starts (it indexes its tasks for minutes first): a local
    folder with config.json, or a hub id in the local cache (only there when offline)."""
    from pmod.io import CheckpointError
    from pmod.io.files import config_path, resolve_folder

    for flag, p in zip(("--model", "--compare"), paths):
        try:
            folder = resolve_folder(p, None, files=["config.json"], what=f"{flag}", local_only=offline or None, patterns=["*.json"])
        except CheckpointError as e:
            raise FileNotFoundError(str(e)) from None
        if not config_path(folder).is_file():
            raise FileNotFoundError(f"{flag} {p}: {folder} holds no config.json, so it is not a checkpoint pmod can load")


def cmd_eval(args) -> int:
    from pmod.evaluation.run import ModelRun, evaluate

    if args.model is None:
        from pmod.evaluation.synth_vqa import PMOD_CKPT

        args.model = str(PMOD_CKPT)
    paths = [args.model] + ([args.compare] if args.compare else [])
    if not args.table_only:
        _check_models(paths, offline=not args.online)
    _quiet_lmms_eval_logs()
    labels = args.labels.split(",") if args.labels else [Path(p.rstrip("/")).name or p for p in paths]
    if len(labels) != len(paths):
        raise ValueError(f"--labels gives {len(labels)} name(s) for {len(paths)} model(s)")
    if len(set(labels)) < len(labels):  # e.g. two folders both called 'checkpoint'
        labels = [f"{i}-{lab}" for i, lab in enumerate(labels)]
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    model_args = {"dtype": args.dtype, "device": args.device, "attn_backend": args.attn_backend,
                  "conv_template": args.conv_template, "prefix_cache_mb": args.prefix_cache_mb}
    files = evaluate([ModelRun(lab, p) for lab, p in zip(labels, paths)], tasks, args.output,
                     batch_size=args.batch_size, limit=args.limit, include_path=args.include_path,
                     synth_data=args.synth_data, num_processes=args.num_processes, model_args=model_args,
                     offline=not args.online, check=not args.no_check, table_only=args.table_only, echo=not args.quiet)
    print(files["md"].read_text())
    print("wrote " + ", ".join(str(f) for f in files.values()))
    return 0
