"""What `pmod generate` and `pmod chat` share: the model options, loading, the context check and one streamed answer."""
from __future__ import annotations

import argparse
import sys
import time

__all__ = ["ContextError", "add_model_args", "answer", "check_context", "load", "messages"]


def add_model_args(p: argparse.ArgumentParser) -> None:
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


def load(args):
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


def messages(args, turns: list[dict[str, str]]) -> list[dict[str, str]]:
    return ([{"role": "system", "content": args.system}] if args.system is not None else []) + turns


def check_context(model, inputs: dict, max_new_tokens: int, cached: int = 0) -> None:
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


def answer(model, processor, messages, images, args, out=None, conversation=None) -> tuple[str, str]:
    """Generate, streaming text to `out` (stdout); returns (answer, one-line efficiency summary).
    With a `conversation` (pmod.conversation), a turn after the first prefills only its new text over the cache."""
    import torch

    out = out or sys.stdout
    from pmod.evaluation.efficiency import measure_efficiency

    inputs = conversation.inputs(messages, images) if conversation is not None else processor(messages, images=images or None)
    cached = conversation.cached if "past_key_values" in inputs else 0
    check_context(model, inputs, args.max_new_tokens, cached)
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
