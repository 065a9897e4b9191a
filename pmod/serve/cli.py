"""`pmod serve --model PATH`: the OpenAI-compatible server (see pmod.serve)."""
from __future__ import annotations

import sys
from pathlib import Path

__all__ = ["add_parser", "run"]


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible server with continuous batching, and a web page at /",
                       description="POST /v1/chat/completions (OpenAI's format: stream, images as data: URLs), "
                                   "GET /v1/models, /health, /metrics (Prometheus) and a web page at /. Needs the "
                                   "serve extra: pip install -e .[serve]")
    p.add_argument("--model", required=True, help="checkpoint folder or hub id")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (the checkpoint's)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--attn-backend", default="auto", choices=["auto", "sdpa", "flash", "eager"])
    p.add_argument("--conv-template", help="conversation template (default: the checkpoint's)")
    p.add_argument("--served-model-name", help="the model id clients send and /v1/models lists (default: the "
                                               "folder's name)")
    p.add_argument("--max-batch", type=int, default=32, help="rows decoded together (default 32)")
    p.add_argument("--max-queue", type=int, default=256, help="requests waiting beyond the batch; more get 429")
    p.add_argument("--prefix-cache-mb", type=float, default=512.0,
                   help="MiB of image prefixes kept for requests that ask about the same image again (LRU; 0: off)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/ (default: none)")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds a request may take, queue included")
    p.add_argument("--max-body-mb", type=float, default=16.0, help="largest request body in MiB (default 16)")
    p.add_argument("--allowed-local-media-path", help="a folder images may be read from by path (default: none)")
    p.add_argument("--allow-remote-images", action="store_true", help="fetch http(s) image URLs (default: off)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(fn=run)


def run(args) -> int:
    for name in ("fastapi", "uvicorn"):
        try:
            __import__(name)
        except ModuleNotFoundError:
            raise ValueError(f"pmod serve needs {name}: pip install -e .[serve]") from None
    if args.max_batch < 1 or args.max_queue < 0:
        raise ValueError(f"--max-batch must be >= 1 and --max-queue >= 0, got {args.max_batch} and {args.max_queue}")
    if not 0 <= args.port < 65536:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    if args.request_timeout <= 0 or args.max_body_mb <= 0:
        raise ValueError("--request-timeout and --max-body-mb must be positive")
    if not args.prefix_cache_mb >= 0:
        raise ValueError(f"--prefix-cache-mb must be >= 0 (0: off), got {args.prefix_cache_mb}")
    folder = None
    if args.allowed_local_media_path:
        folder = Path(args.allowed_local_media_path)
        if not folder.is_dir():
            raise NotADirectoryError(f"--allowed-local-media-path {folder}: no such folder")
    from pmod.serve.media import MediaPolicy
    from pmod.serve.server import build_app, serve

    settings = {"api_key": args.api_key, "request_timeout_s": args.request_timeout,
                "max_body_bytes": int(args.max_body_mb * 2**20),
                "media": MediaPolicy(allowed_folder=folder, allow_remote=args.allow_remote_images)}
    app = build_app(args.model, dtype=args.dtype, device=args.device, attn_backend=args.attn_backend,
                    conv_template=args.conv_template, served_name=args.served_model_name, max_batch=args.max_batch,
                    max_queue=args.max_queue, prefix_cache_mb=args.prefix_cache_mb, settings=settings)
    if args.host not in ("127.0.0.1", "localhost", "::1") and args.api_key is None:
        print(f"pmod serve: warning: listening on {args.host} without --api-key", file=sys.stderr)
    serve(app, args.host, args.port, args.log_level)
    return 0
