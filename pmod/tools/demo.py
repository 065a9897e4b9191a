"""`pmod demo`: the embedded default, end to end and offline.

Loads the tiny p-MoD model shipped in `pmod/assets/` (and its dense twin, trained with the same
budget by `train/embedded_default.py`), answers questions about freshly generated images, scores
both models on the synthetic test split with their prefill TFLOPs, KV bytes and wall time, and
saves a routing map: which patches each MoD layer kept on a sample image, with the share of kept
tokens that fall on objects against the share of the image that objects cover.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from pmod.evaluation.synth_vqa import DENSE_CKPT, PMOD_CKPT, EvalResult, evaluate, normalize, progress, say

__all__ = ["caption_accuracy", "routing_focus", "run", "add_parser"]

def routing_focus(model, processor, record: dict, root: Path, out_png: Path, answers: dict[str, str] | None = None) -> dict:
    """Routing map of one image (kept and dropped patches per MoD layer, object boxes outlined, the question and
    `answers` {model: answer} under the title), and the share of kept vision tokens on object patches per layer."""
    import numpy as np
    from PIL import Image

    from pmod.tools.synthetic import object_patch_mask
    from pmod.tools.viz import kept_patch_grids, save_routing_map

    inputs = processor(record["question"], images=[root / record["image"]])
    with torch.no_grad():
        out = model(**inputs)
    v = model.config.vision
    grid = v.image_size // v.patch_size
    vis_pos = out.vision_mask[0].nonzero().flatten()
    grids = kept_patch_grids(out.routing, vis_pos, grid)
    objects = object_patch_mask(record["objects"], v.image_size, v.patch_size).reshape(grid, grid)
    marks = [f"{name}: {a!r} {'✓' if normalize(a) == normalize(record['answer']) else '✗'}"
             for name, a in (answers or {}).items()]
    caption = [f"Q: {record['question']}", "   ".join([f"truth: {record['answer']!r}", *marks])]
    save_routing_map(Image.open(root / record["image"]), grids, out_png, objects=objects, caption=caption,
                     title="p-MoD routing: the vision tokens each MoD layer keeps",
                     boxes=[o["box"] for o in record["objects"]])
    on_obj = {layer: float((g & objects).sum() / max(g.sum(), 1)) for layer, g in grids.items()}
    return {"object_coverage": float(objects.mean()), "kept_on_objects": on_obj,
            "kept_on_objects_deep_mean": float(np.mean([on_obj[k] for k in sorted(on_obj)[len(on_obj) // 2 :]])),
            "question": record["question"], "truth": record["answer"], "answers": dict(answers or {})}


def dataset_focus(model, processor, records: list[dict], root: Path) -> dict:
    """Average over many images: share of kept tokens on objects, per layer, vs the object coverage."""
    import numpy as np

    from pmod.tools.synthetic import object_patch_mask
    from pmod.tools.viz import kept_patch_grids

    v = model.config.vision
    grid = v.image_size // v.patch_size
    shares: dict[int, list[float]] = {}
    cover = []
    for r in records:
        inputs = processor(r["question"], images=[root / r["image"]])
        with torch.no_grad():
            out = model(**inputs)
        objects = object_patch_mask(r["objects"], v.image_size, v.patch_size).reshape(grid, grid)
        cover.append(objects.mean())
        for layer, g in kept_patch_grids(out.routing, out.vision_mask[0].nonzero().flatten(), grid).items():
            shares.setdefault(layer, []).append(float((g & objects).sum() / max(g.sum(), 1)))
    return {"object_coverage": float(np.mean(cover)), "kept_on_objects": {k: float(np.mean(s)) for k, s in sorted(shares.items())}}


def caption_accuracy(model, processor, records: list[dict], root: Path, batch_size: int = 32,
                     max_new_tokens: int = 48, desc: str = "") -> dict[str, float]:
    """Scene descriptions (the stage-1 task): greedy captions of each record's image, scored per object on
    size, colour and shape at its cell, and per image on the number of objects named."""
    from pmod.tools.synthetic import CELLS, DESCRIBE, parse_caption

    hits = {"size": 0, "color": 0, "shape": 0, "count": 0}
    n_obj = 0
    for i in progress(range(0, len(records), batch_size), desc or "describing"):
        batch = records[i : i + batch_size]
        inputs = processor([DESCRIBE] * len(batch), images=[[root / r["image"]] for r in batch])
        texts = processor.batch_decode(model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False))
        for r, text in zip(batch, texts):
            said = parse_caption(text)
            hits["count"] += len(said) == len(r["objects"])
            for o in r["objects"]:
                size, color, shape = said.get(CELLS[o["cell"]], (None, None, None))
                n_obj += 1
                hits["size"] += size == o["size"]
                hits["color"] += color == o["color"]
                hits["shape"] += shape == o["shape"]
    return {k: v / (len(records) if k == "count" else max(n_obj, 1)) for k, v in hits.items()}


def _table(results: list[EvalResult]) -> str:
    """Accuracy per question type beside the cost per question: prefill FLOPs (complete convention, decoder and
    lm_head) in GFLOPs, KV cache after prefill, wall time of the whole split."""
    from pmod.flops import format_flops

    types = sorted(results[0].per_type)
    head = "| model | accuracy | " + " | ".join(types) + " | prefill GFLOPs | vs dense | KV KiB | vs dense | wall s |"
    rows = [head, "|" + "---|" * (len(types) + 7)]
    for r in results:
        rows.append(
            f"| {r.name} | {100 * r.accuracy:.1f} % | " + " | ".join(f"{100 * r.per_type[t]:.0f}" for t in types)
            + f" | {format_flops(r.tflops * 1e12, 'GFLOPs', 3).split()[0]} | {100 * r.tflops / r.tflops_dense:.1f} % | "
            f"{r.kv_bytes / 1024:.1f} | {100 * r.kv_bytes / r.kv_bytes_dense:.1f} % | {r.seconds:.1f} |"
        )
    return "\n".join(rows)


def run(args) -> int:
    import pmod
    from pmod.tools.synthetic import write_split

    if args.n_test < 1 or args.fresh < 0 or args.captions < 0:
        raise ValueError(f"pmod demo: need --n-test >= 1, --fresh >= 0, --captions >= 0 (got {args.n_test}, {args.fresh}, {args.captions})")
    torch.set_num_threads(max(1, args.threads))
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    for ckpt in (Path(args.model), Path(args.dense)):
        if not (ckpt / "config.json").exists():
            raise FileNotFoundError(f"{ckpt}: no checkpoint there; rebuild the embedded default with `python train/embedded_default.py`")
    pm, proc = pmod.from_pretrained(args.model, dtype=torch.float32, device="cpu"), pmod.load_processor(args.model)
    dense, dproc = pmod.from_pretrained(args.dense, dtype=torch.float32, device="cpu"), pmod.load_processor(args.dense)
    size = pm.config.vision.image_size

    say(f"p-MoD tiny model: {sum(p.numel() for p in pm.parameters()) / 1e6:.2f} M parameters, "
        f"{pm.config.vision.num_patches} vision tokens per image, MoD layers {sorted(pm.config.mod_ratios)}", "")
    data = out_dir / "data"
    fresh_right = {}
    if args.fresh > 0:
        fresh = write_split(out_dir / "fresh", "test", args.fresh, size, seed=args.seed)  # new images, never seen in training
        answers = {name: evaluate(m, pr, fresh, out_dir / "fresh", desc=f"fresh questions, {name}").answers
                   for name, m, pr in (("p-MoD", pm, proc), ("dense", dense, dproc))}
        say(f"Fresh images (seed {args.seed}, never seen in training) in {out_dir / 'fresh'}; ✓ right, ✗ wrong:")
        for i, r in enumerate(fresh):
            got = "   ".join(f"{'✓' if normalize(a[i]) == normalize(r['answer']) else '✗'} {name} {a[i]!r}"
                           for name, a in answers.items())
            say(f"  {r['image']}: {r['question']}", f"      truth {r['answer']!r}   {got}")
        fresh_right = {name: sum(normalize(x) == normalize(r["answer"]) for x, r in zip(a, fresh))
                       for name, a in answers.items()}
        say("  right: " + ", ".join(f"{name} {k} of {len(fresh)}" for name, k in fresh_right.items()))

    test = write_split(data, "test", args.n_test, size)  # the fixed test split (the same for every --seed)
    results = [evaluate(pm, proc, test, data, desc="test split, p-MoD"),
               evaluate(dense, dproc, test, data, desc="test split, dense")]
    results[0].name, results[1].name = "p-MoD", "dense"
    table = _table(results)
    rel = results[0].accuracy / max(results[1].accuracy, 1e-9)
    say(f"\nTest split ({args.n_test} questions; chance ≈ 1/6 colour, 1/4 shape/count/position/choice, 1/2 yes-no):",
        table, "(prefill FLOPs per question in the complete convention, decoder + lm_head; KV cache after the prefill)",
        f"p-MoD reaches {100 * rel:.1f} % of dense accuracy at {100 * results[0].tflops / results[0].tflops_dense:.1f} % "
        f"of its prefill FLOPs and {100 * results[0].kv_bytes / results[0].kv_bytes_dense:.1f} % of its KV cache.")

    captions = {}
    if args.captions:
        for name, m, pr in (("p-MoD", pm, proc), ("dense", dense, dproc)):
            captions[name] = caption_accuracy(m, pr, test[: args.captions], data, desc=f"{name} descriptions")
        say(f"\nScene descriptions (\"Describe the objects.\", the stage-1 task) of {args.captions} test images, per "
            "object at its cell (per image for the count):",
            *(f"  {name}: " + ", ".join(f"{k} {100 * v:.0f} %" for k, v in c.items()) for name, c in captions.items()))

    png = out_dir / "routing_map.png"
    at = next(i for i, r in enumerate(test) if len(r["objects"]) >= 2)
    one = routing_focus(pm, proc, test[at], data, png, answers={r.name: r.answers[at] for r in results})
    many = dataset_focus(pm, proc, test[: args.focus_samples], data)
    deep = sorted(many["kept_on_objects"])[len(many["kept_on_objects"]) // 2 :]
    deep_share = sum(many["kept_on_objects"][k] for k in deep) / len(deep)
    say(f"\nRouting map saved to {png} (test question {at}: {test[at]['question']!r})",
        f"Objects cover {100 * many['object_coverage']:.1f} % of the patches; in the deeper MoD layers {deep} "
        f"{100 * deep_share:.1f} % of the kept vision tokens lie on objects (over {args.focus_samples} test images); "
        "per MoD layer: " + ", ".join(f"{k}: {100 * v:.1f} %" for k, v in many["kept_on_objects"].items())
        + ". (The last layer's router never gets a gradient: nothing reads vision tokens after it.)")
    summary = {
        "accuracy": {r.name: r.accuracy for r in results}, "per_type": {r.name: r.per_type for r in results},
        "relative_accuracy": rel, "flops_ratio": results[0].tflops / results[0].tflops_dense,
        "kv_ratio": results[0].kv_bytes / results[0].kv_bytes_dense, "wall_s": {r.name: r.seconds for r in results},
        "object_coverage": many["object_coverage"], "kept_on_objects": many["kept_on_objects"], "sample": one,
        "captions": captions, "fresh_right": fresh_right, "fresh_seed": args.seed if args.fresh else None,
    }
    (out_dir / "demo.json").write_text(json.dumps(summary, indent=2))
    (out_dir / "demo.md").write_text(table + "\n")
    say(json.dumps({k: summary[k] for k in ("accuracy", "relative_accuracy", "flops_ratio", "kv_ratio")}))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="the embedded default: tiny p-MoD vs dense on a synthetic VQA task, offline")
    p.add_argument("--model", default=str(PMOD_CKPT))
    p.add_argument("--dense", default=str(DENSE_CKPT))
    p.add_argument("--output", default="demo-output")
    p.add_argument("--n-test", type=int, default=600)
    p.add_argument("--fresh", type=int, default=6, help="freshly generated images to answer questions about")
    p.add_argument("--seed", type=int, default=int(time.time()) % 100_000,
                   help="seed of the fresh images (default: new ones each run); the test split is fixed")
    p.add_argument("--focus-samples", type=int, default=100)
    p.add_argument("--captions", type=int, default=96, help="test images to describe and score (0: skip)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids oversubscription on small shared CPUs)")
    p.set_defaults(fn=run)


if __name__ == "__main__":
    from pmod.cli import main

    sys.exit(main(["demo", *sys.argv[1:]]))
