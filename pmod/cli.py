"""The `pmod` command: one entry point, one sub-command per job (`pmod <cmd> --help`)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

__all__ = ["main"]


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint folder or hub id (official p-MoD, LLaVA, llava-hf or ours)")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (the checkpoint's)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--attn-backend", default="auto", choices=["auto", "sdpa", "flash", "eager"])
    p.add_argument("--conv-template", help="conversation template (default: the checkpoint's, vicuna_v1 for p-MoD)")
    p.add_argument("--system", help="system prompt (default: the template's)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)


def _load(args):
    import torch

    import pmod

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    processor = pmod.load_processor(args.model, template=args.conv_template)  # an unknown template fails first
    if args.system is not None and not processor.template.system_format:
        raise ValueError(f"--system: conversation template {processor.template.name!r} has no system prompt; "
                         "pick another --conv-template (vicuna_v1, llava_v1, llama3, chatml)")
    model = pmod.from_pretrained(args.model, dtype=args.dtype, device=device, attn_backend=args.attn_backend)
    return model, processor


class ContextError(ValueError):
    """A prompt (with its images) plus the tokens to generate would not fit the model's context."""


def _messages(args, turns: list[dict[str, str]]) -> list[dict[str, str]]:
    return ([{"role": "system", "content": args.system}] if args.system is not None else []) + turns


def _check_context(model, inputs: dict, max_new_tokens: int, cached: int = 0) -> None:
    """Raise ContextError before the prefill when a row's merged length (text + image tokens, after `cached`
    positions of a conversation's cache) + max_new_tokens exceeds the model's context (the bound `generate` enforces)."""
    from pmod.packing import IMAGE_TOKEN_INDEX

    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    counts = iter(model.image_token_counts(inputs["images"], inputs["image_sizes"]) if inputs["images"] is not None else [])
    context = max(model.config.text.max_position_embeddings, model.config.model_max_length)
    for row, m in zip(ids, mask):
        real = row[m.bool()]
        n_img = int((real == IMAGE_TOKEN_INDEX).sum())
        vision = sum(next(counts) for _ in range(n_img))
        n = int((real != IMAGE_TOKEN_INDEX).sum()) + vision + cached
        if n + max_new_tokens > context:
            what = f"the conversation is {n} tokens" if cached else f"the prompt is {n} tokens ({vision} of them its image's)"
            raise ContextError(f"{what} and --max-new-tokens {max_new_tokens} would take it past the model's context "
                               f"of {context} tokens")


def _answer(model, processor, messages, images, args, out=None, conversation=None) -> tuple[str, str]:
    """Generate, streaming text to `out` (stdout); returns (answer, one-line efficiency summary).
    With a `conversation` (pmod.conversation), a turn after the first prefills only its new text over the cache."""
    import torch

    out = out or sys.stdout
    from pmod.evaluation.efficiency import measure_efficiency

    inputs = conversation.inputs(messages, images) if conversation is not None else processor(messages, images=images or None)
    cached = conversation.cached if "past_key_values" in inputs else 0
    _check_context(model, inputs, args.max_new_tokens, cached)
    printed = ""
    ids: list[int] = []

    def stream(tok):
        nonlocal printed
        ids.append(int(tok[0]))
        text = processor.decode(ids)
        out.write(text[len(printed):])
        out.flush()
        printed = text

    gen = torch.Generator(device=model.device).manual_seed(args.seed)
    t0 = time.perf_counter()
    try:
        tokens, cache = model.generate(
            **inputs, max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0, temperature=max(args.temperature, 1e-5),
            top_p=args.top_p, top_k=args.top_k, streamer=stream, generator=gen, return_cache=True,
        )
    except Exception:
        if conversation is not None:
            conversation.reset()  # the cache may hold part of this turn: the next one prefills the whole history
        raise
    dt = time.perf_counter() - t0
    out.write("\n")
    if conversation is not None:
        conversation.record(tokens, cache)
    if cached:
        lens = cache.layer_lengths()
        line = (f"[continued a cache of {cached} positions: prefilled {inputs['input_ids'].shape[1]} new tokens; "
                f"layer lengths {min(lens)}-{max(lens)}; {tokens.shape[1]} tokens in {dt:.2f} s]")
        return processor.decode(tokens[0]), line
    layout = model.prepare(inputs["input_ids"], inputs["images"], inputs["image_sizes"], inputs["attention_mask"])[1]
    eff = measure_efficiency(model.config, layout, None)
    line = f"[{eff.summary()}; {tokens.shape[1]} tokens in {dt:.2f} s]"
    return processor.decode(tokens[0]), line


def cmd_generate(args) -> int:
    if args.requests is not None:
        return _generate_requests(args)
    if args.prompt is None:
        raise ValueError("give --prompt (one prompt, with its --image files) or --requests FILE.jsonl (a batch)")
    model, processor = _load(args)
    images = args.image or []
    _, summary = _answer(model, processor, _messages(args, [{"role": "user", "content": args.prompt}]), images, args)
    print(summary, file=sys.stderr)
    return 0


def _read_requests(path: Path, image_folder: Path) -> list[dict]:
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


def _generate_requests(args) -> int:
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
    requests = _read_requests(path, Path(args.image_folder) if args.image_folder else path.parent)
    model, processor = _load(args)
    gen = torch.Generator(device=model.device).manual_seed(args.seed)
    for i in range(0, len(requests), args.batch_size):
        batch = requests[i : i + args.batch_size]
        inputs = processor([_messages(args, [{"role": "user", "content": r["prompt"]}]) for r in batch],
                           images=[r["images"] for r in batch])
        _check_context(model, inputs, args.max_new_tokens)
        t0 = time.perf_counter()
        tokens = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                                temperature=max(args.temperature, 1e-5), top_p=args.top_p, top_k=args.top_k,
                                generator=gen)
        dt = time.perf_counter() - t0
        for r, answer in zip(batch, processor.batch_decode(tokens)):
            print(json.dumps({"id": r["id"], "prompt": r["prompt"], "answer": answer}), flush=True)
        layout = model.prepare(inputs["input_ids"], inputs["images"], inputs["image_sizes"], inputs["attention_mask"])[1]
        eff = measure_efficiency(model.config, layout, None)
        print(f"[requests {i + 1}-{i + len(batch)} of {len(requests)}, one batch: {eff.summary()}; {dt:.2f} s]",
              file=sys.stderr)
    return 0


def _open_image(path: str):
    """The image at `path`, decoded (PIL), or ValueError / FileNotFoundError naming the problem."""
    from pmod.multimodal.images import load_image

    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"no image file at {p}")
    return load_image(p)


def cmd_chat(args) -> int:
    """LLaVA's chat: one image per conversation (`--image`, or `/image PATH`, which starts a new conversation).
    The conversation keeps its cache (pmod.conversation): a turn prefills only its new text; /reset drops it."""
    from pmod.conversation import Conversation

    model, processor = _load(args)
    conversation = Conversation(model, processor)
    image = _open_image(args.image) if args.image else None
    history: list[dict[str, str]] = []
    say = lambda s: print(s, file=sys.stderr, flush=True)
    say("pmod chat — /image PATH starts a new conversation about that image, /reset starts one without, /quit exits")
    if image is not None:
        say(f"(a conversation about {args.image})")
    while True:
        try:
            line = input("USER: ").strip()
        except (EOFError, KeyboardInterrupt):  # Ctrl-D / Ctrl-C at the prompt: leave quietly
            print(file=sys.stderr)
            return 0
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return 0
        if line == "/reset":
            history, image = [], None
            conversation.reset()
            say("(new conversation, no image)")
            continue
        if line == "/image" or line.startswith("/image "):
            path = line[len("/image"):].strip()
            try:
                if not path:
                    raise ValueError("usage: /image PATH")
                new = _open_image(path)
            except (OSError, ValueError) as e:
                say(f"error: {e}; the conversation goes on as it was")
                continue
            history, image = [], new
            conversation.reset()
            say(f"(new conversation about {path}: one image per conversation, as in LLaVA's chat)")
            continue
        if line.startswith("/"):
            say(f"unknown command {line.split()[0]}: /image PATH, /reset or /quit")
            continue
        history.append({"role": "user", "content": line})
        print("ASSISTANT: ", end="", flush=True)
        try:
            answer, summary = _answer(model, processor, _messages(args, history), [image] if image else [], args,
                                      conversation=conversation)
        except ContextError as e:
            print()
            say(f"error: {e}; /reset starts a new conversation")
            history.pop()
            continue
        except ValueError as e:  # a template that cannot render this turn, ...: say so, keep the session
            print()
            say(f"error: {e}")
            history.pop()
            continue
        print(summary, file=sys.stderr)
        history.append({"role": "assistant", "content": answer})


def _size(text: str) -> tuple[int, int]:
    """'672x672' -> (672, 672): an image's width and height."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 672x672, got {text!r}") from None
    if w < 1 or h < 1:
        raise argparse.ArgumentTypeError(f"image sides must be positive, got {text!r}")
    return w, h


def cmd_flops(args) -> int:
    import pmod
    from pmod.flops import count_flops, format_table, image_tokens, kv_cache_bytes

    cfg = pmod.load_config(args.model)
    if args.as_pmod:  # a dense checkpoint as `mod=pmod.ModConfig()` would convert it
        cfg = cfg.replace(mod=pmod.ModConfig())
    if args.include_vision and args.convention != "complete":
        raise ValueError("--include-vision counts the vision tower and projector, which only the 'complete' "
                         "convention has: add --convention complete")
    anyres = cfg.image_aspect_ratio == "anyres"
    if args.n_vision is not None and args.include_vision and anyres:
        raise ValueError("an anyres model's tower inputs follow from the image size: pass --image-size WxH "
                         "instead of --n-vision with --include-vision")
    n_vision, tower_images = image_tokens(cfg, args.image_size, args.images)
    v = cfg.vision
    if args.n_vision is not None:
        n_vision, where = args.n_vision, "given"
    elif anyres:
        size = args.image_size or max(cfg.image_grid_pinpoints, key=lambda wh: wh[0] * wh[1])
        where = (f"{args.images} image(s) of {size[0]}x{size[1]} px, anyres: the base image + "
                 f"{tower_images // max(args.images, 1) - 1} crops of {v.image_size} px each, {cfg.mm_patch_merge_type}"
                 + (f", shrunk to ~{cfg.anyres_max_crops} crops (anyres_max)" if cfg.anyres_max_crops else ""))
    elif cfg.image_aspect_ratio == "native":
        from pmod.flops import NATIVE_DEFAULT_SIZE

        size = args.image_size or NATIVE_DEFAULT_SIZE
        where = f"{args.images} image(s) of {size[0]}x{size[1]} px, native resolution (smart_resize, 2x2 merged patches)"
    else:
        where = f"{args.images} image(s), {cfg.image_aspect_ratio}: ({v.image_size}/{v.patch_size})² patches each"
    context = max(cfg.text.max_position_embeddings, cfg.model_max_length)
    n = n_vision + args.n_text
    print(f"{args.model}: {cfg.text.num_hidden_layers} layers, hidden {cfg.text.hidden_size}, "
          f"{len(cfg.mod_ratios)} MoD layers; {n_vision} vision tokens ({where}) + {args.n_text} text tokens = {n}")
    if n > context:
        sys.stdout.flush()
        print(f"warning: {n} tokens exceed the model's context of {context} tokens; the figures below are for a "
              "prompt it cannot take", file=sys.stderr)
    rep = count_flops(cfg, n_vision=n_vision, n_text=args.n_text, convention=args.convention,
                      include_vision=args.include_vision, decode_steps=args.decode_steps,
                      n_images=tower_images if args.include_vision else None)
    print(format_table(rep))
    print(f"prefill{f' + {args.decode_steps} decode steps' if args.decode_steps else ''}: {rep.summary()}")
    if args.convention == "paper":
        print("(--convention complete adds attention scores and routers; with --include-vision, the vision tower and "
              "projector too)")
    kv = kv_cache_bytes(cfg, n_vision=n_vision, n_text=args.n_text, convention="complete", dtype=torch_dtype(args))
    print(f"KV cache ({args.kv_dtype}, text tokens included): {kv.total / 2**20:.2f} MiB vs dense "
          f"{kv.dense_total / 2**20:.2f} MiB ({100 * kv.ratio:.1f} %); vision tokens only, the paper's KV convention: "
          f"{100 * kv.vision_fraction_int:.1f} % (integer k)")
    return 0


def torch_dtype(args):
    import torch

    return getattr(torch, args.kv_dtype)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pmod", description="p-MoD multimodal models: run, train, evaluate, measure")
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("generate", help="answer one prompt about its images, or a JSONL file of requests (batched)",
                       description="One prompt: --prompt with any number of --image files, all of them in that one "
                                   "prompt, in order (before the question, unless it places them with <image>). "
                                   "Several independent prompts: --requests FILE.jsonl, one "
                                   '{"prompt": ..., "image": NAME or [NAMES], "id": ...} per line, answered in '
                                   "batches of --batch-size; one JSON line per request on stdout.")
    _add_model_args(p)
    p.add_argument("--image", action="append", help="image file of the prompt (repeat: several images, one prompt)")
    p.add_argument("--prompt", help="the question (with --image files), or use --requests")
    p.add_argument("--requests", metavar="FILE.jsonl", help="a batch of requests, one JSON object per line")
    p.add_argument("--image-folder", help="with --requests: the folder image names are relative to (default: the "
                                          "file's folder; names may not lead outside it)")
    p.add_argument("--batch-size", type=int, default=8, help="with --requests: requests per generate call")
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("chat", help="interactive multi-turn chat about one image (LLaVA's CLI)")
    _add_model_args(p)
    p.add_argument("--image", help="the conversation's image (/image PATH in the session starts a new one)")
    p.set_defaults(fn=cmd_chat)

    p = sub.add_parser("flops", help="prefill FLOPs and KV cache of a config vs its dense twin",
                       description="FLOPs by part and KV bytes of one prompt, p-MoD against its dense twin, from the "
                                   "config alone (no weights read). Vision tokens default to what the model makes of "
                                   "--images images (anyres: at --image-size).")
    p.add_argument("--model", required=True, help="checkpoint folder or hub id (only config.json is read)")
    p.add_argument("--images", type=int, default=1, help="images in the prompt (default 1)")
    p.add_argument("--image-size", type=_size, metavar="WxH",
                   help="anyres models: the image's size (default: the largest grid pinpoint, 672x672 at LLaVA-NeXT); "
                        "native (Qwen2.5-VL): default 672x672")
    p.add_argument("--n-vision", type=int, help="vision tokens, overriding what --images / --image-size give")
    p.add_argument("--n-text", type=int, default=58, help="text tokens (default 58, the paper's)")
    p.add_argument("--as-pmod", action="store_true",
                   help="count the model as converted to p-MoD with the default schedule (mod=pmod.ModConfig()), "
                        "e.g. a dense LLaVA-OneVision or Qwen2.5-VL checkpoint")
    p.add_argument("--convention", default="paper", choices=["paper", "complete"],
                   help="paper: LLM linears + lm_head, as the paper's TFLOPs; complete: every matmul, attention "
                        "scores and routers included")
    p.add_argument("--include-vision", action="store_true",
                   help="with --convention complete: add the vision tower and projector (shown per part)")
    p.add_argument("--decode-steps", type=int, default=0, help="with --convention complete: add S decode steps")
    p.add_argument("--kv-dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                   help="element type of the KV cache bytes (default float16)")
    p.set_defaults(fn=cmd_flops)

    for name, module in (("train", "pmod.training.cli"), ("eval", "pmod.evaluation.cli"), ("bench", "pmod.bench"), ("demo", "pmod.tools.demo"), ("compare-strategies", "pmod.tools.compare"), ("serve", "pmod.serve.cli"), ("compare-methods", "pmod.tools.compare_methods")):
        try:
            mod = __import__(module, fromlist=["add_parser"])
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
