"""`pmod compare-methods`: p-MoD against training-free vision-token reduction on the embedded default's test split.

Dense, each p-MoD checkpoint (`--model NAME=PATH`, default the shipped one; ablations the same way) and every
training-free method (`pmod.reduction`, applied to the dense twin) answer the same synthetic-VQA test questions.
Each method's budget is set by its keep share so that its prefill FLOPs match a target share of dense: p-MoD's
own (`pmod`) and the shares in `--budgets`. Per row: accuracy per question type, prefill FLOPs (complete convention,
decoder + lm_head, the method's scoring included), KV bytes measured from the cache after prefill, wall time of the
split. Writes results.{md,json,png} atomically (accuracy-vs-FLOPs Pareto plot); the last stdout line is the JSON.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from pmod.evaluation.synth_vqa import DENSE_CKPT, PMOD_CKPT, normalize, progress, say
from pmod.flops import count_flops, kv_cache_bytes
from pmod.reduction import METHODS, ReductionSpec, make_spec

__all__ = ["add_parser", "evaluate_split", "match_keep", "run"]


def match_keep(config, method: str, target: float, n_vision: int, n_text: int) -> tuple[ReductionSpec, float]:
    """The method's spec (default layers) whose FLOPs share of dense (complete convention) is nearest `target`,
    over the keep shares that change a kept count ((j + 1/2) / n_vision): (spec, its share)."""
    best = None
    for j in range(1, n_vision + 1):
        keep = min(1.0, (j + 0.5) / n_vision)
        spec = make_spec(method, config.text.num_hidden_layers, keep=keep)
        share = count_flops(config, n_vision, n_text, "complete", reduction=spec).ratio
        if best is None or abs(share - target) < abs(best[1] - target) - 1e-12:
            best = (spec, share)
    return best


def evaluate_split(model, processor, records: list[dict], root: Path, batch_size: int, desc: str) -> dict:
    """Greedy answers (4 new tokens) to every record: accuracy per type, prefill FLOPs per question (complete,
    decoder + lm_head) against dense, KV bytes per question measured from the cache after prefill, wall time."""
    cfg, spec = model.config, model.reduction
    per_image = cfg.vision.num_patches
    answers, kv, kv_pred, fl, fl_dense = [], 0, 0, 0, 0
    t0 = time.perf_counter()
    for i in progress(range(0, len(records), batch_size), desc):
        batch = records[i : i + batch_size]
        inputs = processor([r["question"] for r in batch], images=[[root / r["image"]] for r in batch])
        tokens, cache = model.generate(**inputs, max_new_tokens=4, do_sample=False, return_cache=True)
        answers += processor.batch_decode(tokens)
        fed = tokens.shape[1] - 1  # decode steps whose token entered the cache (the last one never does)
        kv += cache.nbytes() - fed * len(batch) * sum(cache.token_nbytes(layer) for layer in range(cache.num_layers))
        n_text = (inputs["attention_mask"].sum(1) - 1).tolist()  # the image placeholder is one input token
        rep = count_flops(cfg, [per_image] * len(batch), n_text, "complete", reduction=spec)
        fl, fl_dense = fl + rep.total, fl_dense + rep.dense_total
        kv_pred += kv_cache_bytes(cfg, [per_image] * len(batch), n_text, model.dtype, "complete", reduction=spec).total
    seconds = time.perf_counter() - t0
    right = [normalize(a) == normalize(r["answer"]) for a, r in zip(answers, records)]
    types = sorted({r["type"] for r in records})
    n = len(records)
    return {
        "accuracy": sum(right) / n,
        "per_type": {t: sum(ok for ok, r in zip(right, records) if r["type"] == t) / sum(r["type"] == t for r in records)
                     for t in types},
        "n": n, "wall_s": seconds, "gflops": fl / n / 1e9, "flops_share": fl / fl_dense, "kv_bytes": kv / n,
        "kv_bytes_predicted": kv_pred / n, "answers": answers,
    }


def _parse_models(items: list[str] | None) -> dict[str, str]:
    out = {}
    for item in items or [f"p-MoD={PMOD_CKPT}"]:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--model {item!r}: expected NAME=PATH (e.g. p-MoD={PMOD_CKPT})")
        out[name] = path
    return out


def _budgets(text: str) -> list[str | float]:
    out = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if part == "pmod":
            out.append(part)
            continue
        try:
            share = float(part)
        except ValueError:
            raise ValueError(f"--budgets: {part!r} is neither 'pmod' nor a FLOPs share") from None
        if not 0.0 < share < 1.0:
            raise ValueError(f"--budgets: a FLOPs share must lie in (0, 1), got {share}")
        out.append(share)
    if not out:
        raise ValueError("--budgets: give at least one budget ('pmod' or a share such as 0.35)")
    return out


def run(args) -> int:
    import pmod
    from pmod.tools.compare_methods_report import write_results
    from pmod.tools.synthetic import write_split

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ValueError(f"--methods: unknown {bad}; expected a comma list of {METHODS}")
    if args.n_test < 1 or args.batch_size < 1:
        raise ValueError(f"--n-test and --batch-size must be >= 1, got {args.n_test}, {args.batch_size}")
    budgets, models = _budgets(args.budgets), _parse_models(args.model)
    if "pmod" in budgets and not models:
        raise ValueError("--budgets 'pmod' needs a p-MoD --model to match")
    torch.set_num_threads(max(1, args.threads))
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    dense, dproc = pmod.from_pretrained(args.dense, dtype=torch.float32, device="cpu"), pmod.load_processor(args.dense)
    test = write_split(out_dir / "data", "test", args.n_test, dense.config.vision.image_size)
    rows = [{"name": "dense", "method": "dense", "keep": 1.0, "budget": "dense",
             **evaluate_split(dense, dproc, test, out_dir / "data", args.batch_size, "dense")}]
    for name, path in models.items():
        m, proc = pmod.from_pretrained(path, dtype=torch.float32, device="cpu"), pmod.load_processor(path)
        rows.append({"name": name, "method": "p-MoD", "keep": None, "budget": "trained",
                     **evaluate_split(m, proc, test, out_dir / "data", args.batch_size, name)})
        say(f"{name}: accuracy {100 * rows[-1]['accuracy']:.1f} %, FLOPs {100 * rows[-1]['flops_share']:.1f} % of dense")
    first_pmod = rows[1]["flops_share"] if len(rows) > 1 else None
    n_text = _prompt_text(dproc, test, out_dir / "data")
    for budget in budgets:
        target = first_pmod if budget == "pmod" else budget
        for method in methods:
            spec, share = match_keep(dense.config, method, target, dense.config.vision.num_patches, n_text)
            dense.reduction = spec
            label = f"{method} @{'p-MoD' if budget == 'pmod' else f'{100 * budget:.0f} %'}"
            rows.append({"name": label, "method": method, "keep": spec.keep, "layers": list(spec.layers), "budget": budget,
                         "target_share": target, "spec": spec.describe(),
                         **evaluate_split(dense, dproc, test, out_dir / "data", args.batch_size, label)})
            say(f"{label} ({spec.describe()}): accuracy {100 * rows[-1]['accuracy']:.1f} %, "
                f"FLOPs {100 * rows[-1]['flops_share']:.1f} % of dense")
    dense.reduction = None
    summary = {"n_test": args.n_test, "budgets": budgets, "n_text_mean": n_text, "wall_s_total": time.perf_counter() - t_start, "threads": args.threads,
               "rows": [{k: v for k, v in r.items() if k != "answers"} for r in rows]}
    table = write_results(out_dir, summary)
    say("", table, "", f"results in {out_dir}/results.{{md,json,png}} ({summary['wall_s_total']:.0f} s)")
    say(json.dumps({r["name"]: {"accuracy": round(r["accuracy"], 4), "flops_share": round(r["flops_share"], 4)}
                    for r in summary["rows"]}))
    return 0


def _prompt_text(processor, records: list[dict], root: Path) -> int:
    """Mean text tokens of the split's prompts (chat template and question; the image placeholder not counted)."""
    inputs = processor([r["question"] for r in records], images=[[root / r["image"]] for r in records])
    return round(float((inputs["attention_mask"].sum(1) - 1).float().mean()))


def add_parser(sub) -> None:
    p = sub.add_parser("compare-methods", help="p-MoD vs training-free token reduction (fastv, pyramiddrop, visionzip, "
                                               "random, uniform) at matched FLOPs on the embedded default's test split")
    p.add_argument("--model", action="append", metavar="NAME=PATH",
                   help=f"a p-MoD checkpoint to compare (repeat: ablations); default p-MoD={PMOD_CKPT}")
    p.add_argument("--dense", default=str(DENSE_CKPT), help="the dense twin the training-free methods reduce")
    p.add_argument("--methods", default=",".join(METHODS), help="comma list of training-free methods")
    p.add_argument("--budgets", default="pmod,0.25,0.4,0.75",
                   help="FLOPs shares of dense to match: 'pmod' (the first --model's own) and numbers in (0, 1)")
    p.add_argument("--output", default="compare-methods-output")
    p.add_argument("--n-test", type=int, default=600, help="test questions (the fixed split's first N)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids oversubscription on small shared CPUs)")
    p.set_defaults(fn=run)


if __name__ == "__main__":
    from pmod.cli import main

    sys.exit(main(["compare-methods", *sys.argv[1:]]))
