"""The `pmod` command: one entry point, one sub-command per job (`pmod <cmd> --help`)."""
from __future__ import annotations

import argparse
import sys
import time

__all__ = ["main"]


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint folder or hub id (official p-MoD, LLaVA, llava-hf or ours)")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (the checkpoint's)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--attn-backend", default="auto", choices=["auto", "sdpa", "flash", "eager"])
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)


def _load(args):
    import torch

    import pmod

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = pmod.from_pretrained(args.model, dtype=args.dtype, device=device, attn_backend=args.attn_backend)
    return model, pmod.load_processor(args.model)


def _answer(model, processor, messages, images, args, out=None) -> tuple[str, str]:
    """Generate, streaming text to `out` (stdout); returns (answer, one-line efficiency summary)."""
    import torch

    out = out or sys.stdout
    from pmod.report import measure_efficiency

    inputs = processor(messages, images=images or None)
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
    tokens, cache = model.generate(
        **inputs, max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0, temperature=max(args.temperature, 1e-5),
        top_p=args.top_p, top_k=args.top_k, streamer=stream, generator=gen, return_cache=True,
    )
    dt = time.perf_counter() - t0
    out.write("\n")
    layout = model.prepare(inputs["input_ids"], inputs["images"], inputs["image_sizes"], inputs["attention_mask"])[1]
    eff = measure_efficiency(model.config, layout, None)
    line = f"[{eff.summary()}; {tokens.shape[1]} tokens in {dt:.2f} s]"
    return processor.decode(tokens[0]), line


def cmd_generate(args) -> int:
    model, processor = _load(args)
    images = args.image or []
    _, summary = _answer(model, processor, args.prompt, images, args)
    print(summary, file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    model, processor = _load(args)
    images = list(args.image or [])
    history: list[dict[str, str]] = []
    print("pmod chat — /image PATH adds an image, /reset clears the conversation, /quit exits", file=sys.stderr)
    while True:
        try:
            line = input("USER: ").strip()
        except EOFError:
            return 0
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return 0
        if line == "/reset":
            history, images = [], []
            continue
        if line.startswith("/image "):
            images.append(line.split(" ", 1)[1].strip())
            continue
        history.append({"role": "user", "content": line})
        print("ASSISTANT: ", end="", flush=True)
        try:
            answer, summary = _answer(model, processor, history, images, args)
        except ValueError as e:  # a bad image or an over-long conversation: say so, keep the session
            print(f"\nerror: {e}", file=sys.stderr)
            history.pop()
            continue
        print(summary, file=sys.stderr)
        history.append({"role": "assistant", "content": answer})


def cmd_flops(args) -> int:
    import pmod
    from pmod.flops import count_flops, format_table, kv_cache_bytes

    cfg = pmod.load_config(args.model)
    rep = count_flops(cfg, n_vision=args.n_vision, n_text=args.n_text, convention=args.convention)
    print(format_table(rep))
    print(rep.summary())
    kv = kv_cache_bytes(cfg, n_vision=args.n_vision, n_text=args.n_text, convention="complete")
    print(f"KV cache: {kv.total / 2**20:.1f} MiB vs dense {kv.dense_total / 2**20:.1f} MiB ({100 * kv.ratio:.1f} %)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pmod", description="p-MoD multimodal models: run, train, evaluate, measure")
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("generate", help="answer one prompt about one or more images")
    _add_model_args(p)
    p.add_argument("--image", action="append", help="image file (repeat for several)")
    p.add_argument("--prompt", required=True)
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("chat", help="interactive multi-turn chat")
    _add_model_args(p)
    p.add_argument("--image", action="append", help="image(s) for the conversation")
    p.set_defaults(fn=cmd_chat)

    p = sub.add_parser("flops", help="prefill TFLOPs and KV cache of a config vs its dense twin")
    p.add_argument("--model", required=True)
    p.add_argument("--n-vision", type=int, default=576)
    p.add_argument("--n-text", type=int, default=58)
    p.add_argument("--convention", default="paper", choices=["paper", "complete"])
    p.set_defaults(fn=cmd_flops)

    for name, module in (("train", "pmod.training.cli"), ("eval", "pmod.evaluation.cli"), ("bench", "pmod.bench"), ("demo", "pmod.demo"), ("compare-strategies", "pmod.peft.compare")):
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
