"""Model inputs of requests: one row from a chat request (processor + context check), several rows packed into
one prefill batch (left padding; images in row order, as `model.generate` takes them)."""
from __future__ import annotations

import threading

import torch

from pmod.packing import IMAGE_TOKEN_INDEX
from pmod.serve.protocol import ChatRequest, RequestError

__all__ = ["context_length", "request_inputs", "stack_inputs"]

_TOKENIZER = threading.Lock()  # a fast tokenizer object is not safe to call from several threads at once


def context_length(model) -> int:
    return max(model.config.text.max_position_embeddings, model.config.model_max_length)


def request_inputs(model, processor, req: ChatRequest, images: list) -> tuple[dict, int, int]:
    """-> (inputs of one row, prompt tokens with the image tokens, max_tokens); RequestError(400) for a prompt
    that does not fit the context or does not match its images."""
    try:
        with _TOKENIZER:
            inputs = processor(req.messages, images=images or None)
    except ValueError as e:  # placeholder / image count mismatch, a template that cannot render the turns
        raise RequestError(400, f"messages: {e}", "messages") from None
    ids = inputs["input_ids"][0]
    counts = model.image_token_counts(inputs["images"], inputs["image_sizes"]) if images else []
    n = int((ids != IMAGE_TOKEN_INDEX).sum()) + sum(counts)
    ctx = context_length(model)
    max_tokens = req.max_tokens if req.max_tokens is not None else ctx - n
    if n + max(max_tokens, 1) > ctx:
        raise RequestError(400, f"This model's maximum context length is {ctx} tokens. However, you requested "
                                f"{n + max_tokens} tokens ({n} in the messages, {sum(counts)} of them image tokens, "
                                f"{max_tokens} in the completion). Please reduce the length of the messages or "
                                "completion.", "messages" if req.max_tokens is None else "max_tokens")
    return inputs, n, max_tokens


def stack_inputs(rows: list[dict], pad_id: int) -> dict:
    """One-row inputs -> one left-padded batch: input_ids / attention_mask [B, T], images and sizes in row order."""
    T = max(r["input_ids"].shape[1] for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        t = r["input_ids"].shape[1]
        ids[b, T - t :], mask[b, T - t :] = r["input_ids"][0], r["attention_mask"][0]
    with_images = [r for r in rows if r["images"] is not None]
    images = sizes = None
    if with_images:
        first = with_images[0]["images"]
        images = torch.cat([r["images"] for r in with_images]) if torch.is_tensor(first) else [
            crop for r in with_images for crop in r["images"]]  # anyres: one [1+n, 3, S, S] per image
        sizes = [s for r in with_images for s in r["image_sizes"]]
    return {"input_ids": ids, "attention_mask": mask, "images": images, "image_sizes": sizes}
