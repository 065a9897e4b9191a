"""`pmod generate`: one prompt about its images, or a JSONL file of requests answered in batches."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from pmod.tools.answer import add_model_args, answer, check_context, load, messages

__all__ = ["add_parser", "cmd_generate", "read_requests"]


def cmd_generate(args) -> int:
    if args.requests is not None:
        return generate_requests(args)
    if args.prompt is None:
        raise ValueError("give --prompt (one prompt, with its --image files) or --requests FILE.jsonl (a batch)")
    model, processor = load(args)
    images = args.image or []
    _, summary = answer(model, processor, messages(args, [{"role": "user", "content": args.prompt}]), images, args)
    print(summary, file=sys.stderr)
    return 0


def read_requests(path: Path, image_folder: Path) -> list[dict]:
    """Requests of a JSONL file, checked: {"prompt": str, "image": name or [names] (optional), "id": any (optional)}.
    Image names are relative to `image_folder` and must stay inside it."""
    import json

    if not path.is_file():
        raise FileNotFoundError(f"--requests {path}: no such file")
    root = image_folder.resolve()
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        where = f"{path}, line {i + 1}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not JSON ({e.msg})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
            raise ValueError(f'{where}: expected an object with a "prompt" string, got {line[:80]!r}')
        names = rec.get("image", [])
        names = [names] if isinstance(names, str) else names
        if not isinstance(names, list) or not all(isinstance(x, str) and x for x in names):
            raise ValueError(f'{where}: "image" must be a file name or a list of them, got {rec.get("image")!r}')
        paths = [(root / x).resolve() for x in names]
        outside = [x for x, p in zip(names, paths) if not p.is_relative_to(root)]
        if outside:
            raise ValueError(f"{where}: image {outside[0]!r} lies outside the image folder {root}")
        missing = [x for x, p in zip(names, paths) if not p.is_file()]
        if missing:  # found before any model is loaded, not halfway through the answers
            raise FileNotFoundError(f"{where}: no image file {missing[0]!r} in {root}")
        out.append({"id": rec.get("id", len(out)), "prompt": rec["prompt"], "images": paths})
    if not out:
        raise ValueError(f"--requests {path}: no requests in the file")
    return out


def generate_requests(args) -> int:
    """`pmod generate --requests FILE.jsonl`: batched greedy (or sampled) answers, one JSON line per request on
    stdout in the file's order; a summary per batch on stderr."""
    import json

    import torch

    from pmod.evaluation.efficiency import measure_efficiency

    if args.prompt is not None or args.image:
        raise ValueError("--requests holds the prompts and images; do not combine it with --prompt / --image")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    path = Path(args.requests)
    requests = read_requests(path, Path(args.image_folder) if args.image_folder else path.parent)
    model, processor = load(args)
    gen = torch.Generator(device=model.device).manual_seed(args.seed)
    for i in range(0, len(requests), args.batch_size):
        batch = requests[i : i + args.batch_size]
        inputs = processor([messages(args, [{"role": "user", "content": r["prompt"]}]) for r in batch],
                           images=[r["images"] for r in batch])
        check_context(model, inputs, args.max_new_tokens)
        t0 = time.perf_counter()
        tokens = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                                temperature=max(args.temperature, 1e-5), top_p=args.top_p, top_k=args.top_k,
                                generator=gen)
        dt = time.perf_counter() - t0
        for r, text in zip(batch, processor.batch_decode(tokens)):
            print(json.dumps({"id": r["id"], "prompt": r["prompt"], "answer": text}), flush=True)
        layout = model.prepare(inputs["input_ids"], inputs["images"], inputs["image_sizes"], inputs["attention_mask"])[1]
        eff = measure_efficiency(model.config, layout, None)
        print(f"[requests {i + 1}-{i + len(batch)} of {len(requests)}, one batch: {eff.summary()}; {dt:.2f} s]",
              file=sys.stderr)
    return 0


def add_parser(sub) -> None:
    """Register `pmod generate`."""
    p = sub.add_parser("generate", help="answer one prompt about its images, or a JSONL file of requests (batched)",
                       description="One prompt: --prompt with any number of --image files, all of them in that one "
                                   "prompt, in order (before the question, unless it places them with <image>). "
                                   "Several independent prompts: --requests FILE.jsonl, one "
                                   '{"prompt": ..., "image": NAME or [NAMES], "id": ...} per line, answered in '
                                   "batches of --batch-size; one JSON line per request on stdout.")
    add_model_args(p)
    p.add_argument("--image", action="append", help="image file of the prompt (repeat: several images, one prompt)")
    p.add_argument("--prompt", help="the question (with --image files), or use --requests")
    p.add_argument("--requests", metavar="FILE.jsonl", help="a batch of requests, one JSON object per line")
    p.add_argument("--image-folder", help="with --requests: the folder image names are relative to (default: the "
                                          "file's folder; names may not lead outside it)")
    p.add_argument("--batch-size", type=int, default=8, help="with --requests: requests per generate call")
    p.set_defaults(fn=cmd_generate)
