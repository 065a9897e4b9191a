"""Every fine-tuning strategy on the synthetic VQA task, from one starting checkpoint, with one step budget.

    python -m pmod.tools.compare --output runs/compare        # or pmod.tools.compare.compare(CompareConfig(...))

The task (`pmod.tools.synthetic`): a tiny p-MoD model (CLIP 64-wide at 64 px / 16 px patches, 4-layer 128-wide
decoder) is first trained fully, vision tower included, on three question types (colour, shape, count): the
"base" checkpoint. Each strategy then fine-tunes it on all six types through `pmod.training.train` (the real
loop: accelerate, checkpoint, export with merging), and the exported plain checkpoint answers the validation
split greedily. `--base CKPT` starts from a given checkpoint instead, e.g. the embedded default
`pmod/assets/tiny-synth-pmod`: a vision tower trained from scratch needs far more than a CPU minute before its
answers depend on the image.
Each run is its own process, so peak memory is its own. Measured per strategy:
- val accuracy (exact match), trainable parameters (during a step; LISA: its active set),
- optimizer-state bytes (the largest over the run; 8-bit rows hold real bitsandbytes states) and what 8-bit
  moments would take (analytic),
- peak memory over the training steps (CUDA: max allocated; CPU: peak RSS above the RSS before step 0,
  via /proc/self/clear_refs), and the median step time (forward, backward, optimizer; data loading excluded).
Writes `comparison.md`, `comparison.png` and `comparison.json`; its last stdout line is that JSON.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import queue
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["ROWS", "CompareConfig", "adamw_vs_gradnormlorp_7b", "add_parser", "compare", "main"]

# (label, strategy, options, learning-rate kind). LISA: one of the 4 layers per 20-step interval (LMFlow's
# gamma = 2 of 32 layers is a far smaller share). The ticket's mask comes from the `full` row's result.
ROWS: list[tuple[str, str, dict[str, Any], str]] = [
    ("full", "full", {}, "full"),
    ("lora", "lora", {"r": 8, "alpha": 16}, "adapter"),
    ("lisa", "lisa", {"activated_layers": 1, "interval_steps": 20}, "full"),
    ("lora-ggpo", "lora-ggpo", {"r": 8, "alpha": 16}, "adapter"),
    ("lora-mgpo", "lora-mgpo", {"r": 8, "alpha": 16}, "adapter"),
    ("gradnormlorp", "gradnormlorp", {}, "adapter"),
    ("gradnormlorp full 8-bit", "gradnormlorp", {"mode": "full", "rank": 32, "optim_bits": 8}, "galore"),
    ("bone", "bone", {"r": 16}, "adapter"),
    ("miss", "miss", {"r": 16}, "adapter"),
    ("ticket", "ticket", {"keep": 0.4, "mask_from": "@full"}, "full"),
]
BASE_TYPES = ("color", "shape", "count")


@dataclass
class CompareConfig:
    output: str
    rows: list[str] | None = None  # labels of ROWS; None = all
    base: str | None = None  # start every row from this checkpoint (e.g. the embedded default) instead of training one
    steps: int = 150
    base_steps: int = 600
    batch_size: int = 16
    n_train: int = 600  # images; 3 questions each
    n_val: int = 150
    lr_base: float = 3e-3
    lr_full: float = 1e-3
    lr_adapter: float = 5e-3
    lr_galore: float = 5e-3
    seed: int = 0
    threads: int = 1


# --- the task ------------------------------------------------------------------------------------
def _model_config(vocab: int):
    from pmod.config import PmodConfig

    return PmodConfig.from_name("synth-compare", text={"vocab_size": vocab})


def prepare_task(root: Path, cfg: CompareConfig) -> dict[str, Path]:
    """Data (train on all types, base on three), tokenizer and the random init checkpoint."""
    from pmod.modeling.llava import PmodForConditionalGeneration
    from pmod.tools.synthetic import corpus, train_tokenizer, write_split

    root.mkdir(parents=True, exist_ok=True)
    train = write_split(root, "train", cfg.n_train, 64, rounds=3)
    val = write_split(root, "val", cfg.n_val, 64)
    types = {r["id"]: r["type"] for r in train}
    base = []
    for c in json.loads((root / "train.json").read_text()):  # keep the base types' question / answer pairs
        turns = [t for j in range(len(c["conversations"]) // 2) if types[f"{c['id']}_{j}"] in BASE_TYPES
                 for t in c["conversations"][2 * j:2 * j + 2]]
        if turns:
            turns = [{**t, "value": t["value"].removeprefix("<image>\n")} for t in turns]
            turns[0]["value"] = "<image>\n" + turns[0]["value"]  # the image goes with the first kept question
            base.append({**c, "conversations": turns})
    (root / "base.json").write_text(json.dumps(base))
    tok = train_tokenizer(corpus(train + val))
    torch.manual_seed(cfg.seed)
    model = PmodForConditionalGeneration(_model_config(len(tok))).init_weights()
    model.save_pretrained(root / "init")
    tok.save_pretrained(str(root / "init"))
    return {"root": root, "init": root / "init", "train": root / "train.json", "base": root / "base.json", "val": root / "val.jsonl"}


# --- one run, in its own process -----------------------------------------------------------------
def _rss_kib(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    return 0


class Meter:
    """A training callback (`pmod.training.loop.Callback`): per step, the time from its batches being loaded to its
    optimizer step done, the trainable parameters, the optimizer's state bytes (and as 8-bit moments) and the peak
    memory over the steps (CUDA: max allocated; CPU: peak RSS above the RSS before step 0)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.state = self.state8 = self.trainable = self.peak = self.rss0 = 0

    def on_step_begin(self, step: int, model, optimizer) -> None:
        if step == 0:
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            try:
                Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux >= 4.0)
            except OSError:
                pass
            self.rss0 = _rss_kib("VmRSS")
        self.model, self.optimizer, self.t0 = model, optimizer, time.perf_counter()

    def on_step_end(self, step: int, logs) -> None:
        from pmod.peft.base import optimizer_state_bytes, optimizer_state_bytes_8bit, trainable_count

        self.times.append(time.perf_counter() - self.t0)
        self.trainable = max(self.trainable, trainable_count(self.model))  # LISA: its active set
        self.state = max(self.state, optimizer_state_bytes(self.optimizer))
        self.state8 = max(self.state8, optimizer_state_bytes_8bit(self.optimizer))
        self.peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else (_rss_kib("VmHWM") - self.rss0) * 1024


def run_one(label: str, strategy: str, options: dict[str, Any], lr: float, model: Path, data: Path, task: dict[str, Path],
            out: Path, cfg: CompareConfig, steps: int, train_vision_tower: bool = False) -> dict[str, Any]:
    from pmod.training import resolve_config, train

    torch.set_num_threads(cfg.threads)
    run_cfg = resolve_config(model=str(model), data=str(data), image_folder=str(task["root"]), output=str(out), strategy=strategy,
                             strategy_options=options, max_steps=steps,
                             per_device_batch_size=cfg.batch_size, learning_rate=lr, warmup_ratio=0.05, lr_scheduler="cosine",
                             save_steps=10**9, save_total_limit=1, logging_steps=max(1, steps // 10), template="chat_nosys",
                             seed=cfg.seed, num_workers=0, check_images=False, train_vision_tower=train_vision_tower)
    meter = Meter()
    res = train(run_cfg, callbacks=[meter])
    accuracy, per_type = _evaluate(res.exported, task, label)
    times = meter.times[2:] or meter.times
    return {"label": label, "strategy": strategy, "options": options, "lr": lr, "accuracy": accuracy, "per_type": per_type,
            "trainable": meter.trainable, "state_bytes": meter.state, "state_bytes_8bit": meter.state8,
            "peak_bytes": meter.peak, "step_ms": 1000 * statistics.median(times), "loss": res.loss,
            "exported": str(res.exported)}


def _evaluate(checkpoint: Path, task: dict[str, Path], label: str) -> tuple[float, dict[str, float]]:
    """Greedy exact-match accuracy of a plain checkpoint on the validation split (no training code involved)."""
    import pmod
    from pmod.evaluation.synth_vqa import evaluate

    model = pmod.from_pretrained(checkpoint, dtype=torch.float32).eval()
    records = [json.loads(x) for x in task["val"].read_text().splitlines()]
    ev = evaluate(model, pmod.load_processor(checkpoint), records, task["root"], batch_size=50, desc=label)
    return ev.accuracy, ev.per_type


def _child(q, *args) -> None:
    try:
        q.put(run_one(*args))
    except BaseException as e:  # noqa: BLE001  (report any failure to the parent, which re-raises it)
        import traceback

        q.put({"error": f"{type(e).__name__}: {e}\n{traceback.format_exc()}"})


def _in_process(*args) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(q, *args))
    p.start()
    while True:
        try:
            out = q.get(timeout=5)
            break
        except queue.Empty:
            if not p.is_alive():
                raise RuntimeError(f"comparison run {args[0]!r}: its process died (exit code {p.exitcode})") from None
    p.join()
    if "error" in out:
        raise RuntimeError(f"comparison run {args[0]!r} failed: {out['error']}")
    return out


# --- the whole comparison -----------------------------------------------------------------------
def adamw_vs_gradnormlorp_7b(rank: int = 128) -> dict[str, float]:
    """Analytic optimizer-state bytes at p-MoD-LLaVA-7B decoder shapes (Vicuna-7B: 32 layers, C 4096, F 11008,
    V 32000; projector 1024 -> 4096 -> 4096): AdamW fp32 over everything full fine-tuning trains, against
    GradNormLoRP full-weight mode with 8-bit moments (projected targets: 2·r·max bytes + fp32 projector
    r·min·4; magnitudes, routers, projector 8-bit; embeddings, norms, head frozen as the strategy runs)."""
    from pmod.config import PmodConfig

    cfg = PmodConfig.from_name("llava-1.5-7b")
    t = cfg.text
    L, C, F, V, Cv = t.num_hidden_layers, t.hidden_size, t.intermediate_size, t.vocab_size, cfg.vision.hidden_size
    mats = [(C, C)] * 4 + [(F, C), (F, C), (C, F)]
    full = L * sum(m * n for m, n in mats) + L * 2 * C + 2 * V * C + C + (Cv * C + C + C * C + C) + L * (C + 1)

    def q8(n: int) -> int:  # one 8-bit moment (blockwise, absmax per 256) or fp32 when small
        return n + 4 * math.ceil(n / 256) if n >= 4096 else 4 * n

    g = L * sum(2 * q8(rank * max(m, n)) + 4 * rank * min(m, n) + 2 * q8(m) for m, n in mats)
    g += sum(2 * q8(n) for n in (Cv * C, C, C * C, C)) + L * (2 * q8(C) + 8)
    return {"adamw_bytes": 8.0 * full, "gradnormlorp8_bytes": float(g), "saving": 1 - g / (8.0 * full)}


def compare(cfg: CompareConfig) -> list[dict[str, Any]]:
    out = Path(cfg.output)
    rows = [r for r in ROWS if cfg.rows is None or r[0] in cfg.rows]
    task = prepare_task(out / "task", cfg)
    lrs = {"full": cfg.lr_full, "adapter": cfg.lr_adapter, "galore": cfg.lr_galore}
    t0 = time.perf_counter()
    if cfg.base:  # evaluated as it is: zero steps are not a run, so score it directly
        base = {"label": "base", "exported": cfg.base, "accuracy": _evaluate(Path(cfg.base), task, "base")[0], "steps": 0}
    else:  # the base stage also trains the (random) vision tower: our stand-in for a pretrained CLIP
        base = _in_process("base", "full", {}, cfg.lr_base, task["init"], task["base"], task, out / "runs" / "base", cfg,
                           cfg.base_steps, True)
    results = []
    for label, strategy, options, kind in rows:
        if options.get("mask_from") == "@full":
            src = next((r["exported"] for r in results if r["label"] == "full"), None)
            if src is None:
                raise ValueError("the ticket row needs the 'full' row before it (its mask comes from that result)")
            options = {**options, "mask_from": src}
        res = _in_process(label, strategy, options, lrs[kind], Path(base["exported"]), task["train"], task,
                          out / "runs" / label.replace(" ", "-"), cfg, cfg.steps)
        results.append(res)
        print(f"{label}: accuracy {res['accuracy']:.3f}, state {res['state_bytes'] / 1024:.0f} KiB, {res['step_ms']:.0f} ms/step",
              file=sys.stderr)
    summary = {"config": asdict(cfg), "base": base, "rows": results, "seconds": time.perf_counter() - t0,
               "device": "cuda" if torch.cuda.is_available() else "cpu", "at_7b": adamw_vs_gradnormlorp_7b()}
    from pmod.tools.compare_report import plot, table

    (out / "comparison.md").write_text(table(summary))
    plot(results, out / "comparison.png")
    (out / "comparison.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({r["label"]: round(r["accuracy"], 4) for r in results}))
    return results


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("compare-strategies", help="every fine-tuning strategy on the synthetic task: accuracy, memory, time")
    _arguments(p)
    p.set_defaults(fn=_run_args)
    return p


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", required=True, help="folder for the task, the runs and comparison.{md,png,json}")
    p.add_argument("--rows", help=f"comma-separated subset of: {', '.join(r[0] for r in ROWS)}")
    p.add_argument("--base", help="start from this checkpoint (e.g. pmod/assets/tiny-synth-pmod) instead of training a base")
    for name in ("steps", "base_steps", "batch_size", "n_train", "n_val", "seed", "threads"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(CompareConfig, name))
    for name in ("lr_base", "lr_full", "lr_adapter", "lr_galore"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(CompareConfig, name))


def _run_args(args: argparse.Namespace) -> int:
    fields = {k: v for k, v in vars(args).items() if k in CompareConfig.__dataclass_fields__}
    fields["rows"] = [r.strip() for r in args.rows.split(",")] if args.rows else None
    compare(CompareConfig(**fields))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pmod.tools.compare", description=__doc__.split("\n\n")[0])
    _arguments(p)
    return _run_args(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
