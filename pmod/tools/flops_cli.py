"""`pmod flops`: prefill FLOPs by part and KV bytes of one prompt, p-MoD against its dense twin, from the config."""
from __future__ import annotations

import argparse
import sys

__all__ = ["add_parser", "cmd_flops"]


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


def add_parser(sub) -> None:
    """Register `pmod flops`."""
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
