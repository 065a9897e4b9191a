"""Argument checks at the public boundary (forward, generate): pure functions that raise a ValueError naming
the argument and the bad value, before anything large is allocated or any kernel runs.

Why here and not deep inside: a token id outside the vocabulary otherwise surfaces as `index out of range in
self` from an embedding, an attention mask of the wrong shape as a numpy broadcast error, NaN pixels or a NaN
temperature as pad-token answers. The token checks run on the host copy of `input_ids` that the layout needs
anyway (one device-to-host copy per prefill, as before). Legend: B rows, T input length, V vocab.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from pmod.packing import IMAGE_TOKEN_INDEX

__all__ = ["NonFiniteError", "check_batch", "check_images", "check_sampling", "check_generation", "merged_lengths", "nonfinite_rows"]


class NonFiniteError(ValueError):
    """NaN or Inf where a finite value is required (logits during generation)."""


def _rows(idx: np.ndarray, n: int = 5) -> str:
    more = f" and {len(idx) - n} more" if len(idx) > n else ""
    return ", ".join(str(int(i)) for i in idx[:n]) + more


def check_batch(input_ids: Any, attention_mask: Any, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """-> host (CPU) copies of input_ids [B, T] and attention_mask [B, T] (or None), after checking them."""
    if not isinstance(input_ids, torch.Tensor):
        raise ValueError(f"input_ids must be a torch.Tensor of token ids [B, T], got {type(input_ids).__name__}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}; use .long()")
    if input_ids.numel() == 0:
        raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)}); a batch needs at least one token per row")
    ids = input_ids.detach().cpu()
    mask = None
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor):
            raise ValueError(f"attention_mask must be a torch.Tensor [B, T], got {type(attention_mask).__name__}")
        if tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids {tuple(input_ids.shape)}; "
                             f"they must match")
        mask = attention_mask.detach().cpu()
        m = mask.numpy() if mask.dtype != torch.bfloat16 else mask.float().numpy()
        if not np.isin(m, (0, 1)).all():
            bad = np.unique(m[~np.isin(m, (0, 1))])[:5].tolist()
            raise ValueError(f"attention_mask must hold 0 (padding) and 1 (real token) only, got {bad}")
        empty = np.flatnonzero(~m.astype(bool).any(1))
        if empty.size:
            raise ValueError(f"attention_mask row(s) {_rows(empty)} are all 0: every row needs at least one real token")
    a = ids.numpy()
    real = np.ones_like(a, dtype=bool) if mask is None else mask.numpy().astype(bool)
    bad = real & (a != IMAGE_TOKEN_INDEX) & ((a < 0) | (a >= vocab_size))
    if bad.any():
        r, c = np.nonzero(bad)
        raise ValueError(f"input_ids hold {int(bad.sum())} token id(s) outside the vocabulary [0, {vocab_size}): "
                         f"{int(a[r[0], c[0]])} at row {int(r[0])}, position {int(c[0])}"
                         f" (image placeholders are {IMAGE_TOKEN_INDEX})")
    return ids, mask


def merged_lengths(ids: torch.Tensor, mask: torch.Tensor | None, counts: Sequence[int]) -> list[int]:
    """Each row's length once image features are inserted (the host arithmetic of `build_layout`)."""
    a = ids.numpy()
    real = np.ones_like(a, dtype=bool) if mask is None else mask.numpy().astype(bool)
    is_img = (a == IMAGE_TOKEN_INDEX) & real
    if int(is_img.sum()) != len(counts):
        raise ValueError(f"input_ids hold {int(is_img.sum())} image placeholder(s) ({IMAGE_TOKEN_INDEX}) but {len(counts)} "
                         f"image(s) were given; pass exactly one image per placeholder")
    expand = real.astype(np.int64)
    expand[is_img] = np.asarray(counts, dtype=np.int64)
    return expand.sum(1).tolist()


def check_images(images: Any, config, n_expected: int | None = None) -> None:
    """Pixel tensors of the shape the model's pipeline makes, floating, and finite (named by image index)."""
    if images is None:
        return
    if config.vision.backend in ("qwen2_5_vl", "qwen3_vl"):
        from pmod.modeling.vision_qwen import check_qwen_pixels

        return check_qwen_pixels(images, config.vision)
    S = config.vision.image_size
    anyres = config.image_aspect_ratio == "anyres"
    if isinstance(images, torch.Tensor):
        items = list(images) if anyres and images.dim() == 5 else [images]
    elif isinstance(images, (list, tuple)):
        items = list(images)
        if not all(isinstance(x, torch.Tensor) for x in items):
            raise ValueError(f"images must be pixel tensors (see the processor), got a list holding "
                             f"{sorted({type(x).__name__ for x in items if not isinstance(x, torch.Tensor)})}")
    else:
        raise ValueError(f"images must be a tensor [N, 3, S, S] (or, for anyres, a list of [1+n, 3, S, S]), got {type(images).__name__}")
    for i, x in enumerate(items):
        if not x.dtype.is_floating_point:
            raise ValueError(f"images must hold floating pixel values (normalised by the processor), got dtype {x.dtype}")
        want = "[1+n, 3, S, S] crops" if anyres else "[N, 3, S, S]"
        if x.dim() != 4 or x.shape[1] != 3 or tuple(x.shape[-2:]) != (S, S):
            shape = tuple(x.shape)
            raise ValueError(f"images{f'[{i}]' if len(items) > 1 else ''} has shape {shape}; this model takes {want} with S={S} "
                             f"(image_aspect_ratio={config.image_aspect_ratio!r})")
        if x.device.type == "meta":  # shapes only (7B accounting on the meta device): no values to check
            continue
        finite = torch.isfinite(x).flatten(1).all(1)  # [N]
        if not bool(finite.all()):
            bad = torch.nonzero(~finite).flatten().cpu().numpy()
            where = f"image {i}, crop(s) {_rows(bad)}" if anyres else f"image(s) {_rows(bad)}"
            raise ValueError(f"images hold NaN or Inf pixel values ({where}); check the preprocessing")


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool) and math.isfinite(v)


def check_sampling(do_sample: Any, temperature: Any, top_k: Any, top_p: Any) -> None:
    if not isinstance(do_sample, bool):
        raise ValueError(f"do_sample must be True or False, got {do_sample!r}")
    if not _is_real(temperature):
        raise ValueError(f"temperature must be a finite number, got {temperature!r}")
    if do_sample and temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}; use do_sample=False for greedy")
    if not _is_int(top_k) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 = no top-k filter), got {top_k!r}")
    if not _is_real(top_p) or not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1 = no nucleus filter), got {top_p!r}")


def check_generation(max_new_tokens: Any, stop_strings: Any, tokenizer: Any, eos_token_id: Any, pad_token_id: Any) -> list[str] | None:
    """-> stop_strings as a list (a single string allowed), after checking every generation argument."""
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    for name, v in (("eos_token_id", eos_token_id), ("pad_token_id", pad_token_id)):
        vals = v if isinstance(v, (list, tuple)) and name == "eos_token_id" else [v]
        if v is not None and not all(_is_int(x) for x in vals):
            raise ValueError(f"{name} must be a token id{' or a list of them' if name == 'eos_token_id' else ''}, got {v!r}")
    if stop_strings is None:
        return None
    stops = [stop_strings] if isinstance(stop_strings, str) else stop_strings
    if not isinstance(stops, (list, tuple)):
        raise ValueError(f"stop_strings must be a string or a list of strings, got {type(stop_strings).__name__}")
    for i, s in enumerate(stops):
        if not isinstance(s, str) or not s:
            raise ValueError(f"stop_strings[{i}] = {s!r}: each stop string must be a non-empty string (an empty one would "
                             f"stop every row at its first token)")
    if stops and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer to decode the generated text")
    return list(stops)


def nonfinite_rows(logits: torch.Tensor) -> list[int]:
    """Rows of logits [B, V] holding NaN or Inf (+Inf included: it makes softmax NaN)."""
    return torch.nonzero(~torch.isfinite(logits).all(-1)).flatten().tolist()
