"""Continuing from a cache: a chunk of new tokens appended to a reduced PmodCache in one step.

Routing of a vision token depends only on the tokens before it (PMOD_SPEC §5), so the reduced cache
of a prefix is valid for every continuation. A chunk is laid out as a prefill of its own tokens
(`build_layout` on the new `input_ids`: text, or text with new images), then
- positions continue the full sequence: each row's chunk starts at `cache.positions[b]`;
- every layer attends over its own cache plus the new tokens (`AttnContext(extend=True)`):
  text passes every layer, and a MoD layer routes the chunk's vision tokens among themselves, as a
  prefill of the chunk would (one image per chunk row = that image routed on its own);
- the cache grows by what each layer processed: text + the kept new vision tokens.
Legend: B rows, N new packed tokens.
"""
from __future__ import annotations

import dataclasses

import torch

from pmod.cache import PmodCache
from pmod.packing import Layout

__all__ = ["check_continuable", "chunk_layout", "advance_positions"]


def check_continuable(cache: PmodCache, batch_size: int, heads_first: bool, backend_name: str) -> None:
    """Named errors for a cache that this chunk cannot continue, before anything runs."""
    if not isinstance(cache, PmodCache):
        raise TypeError(f"past_key_values must be a PmodCache (from use_cache=True or generate(return_cache=True)), "
                        f"got {type(cache).__name__}")
    if cache.batch_size != batch_size:
        raise ValueError(f"past_key_values holds {cache.batch_size} row(s) but input_ids has {batch_size}: "
                         f"one new chunk per cached row")
    if cache.static:
        raise ValueError("past_key_values is static (captured by a CUDA graph); continue from cache.copy()")
    if cache.positions is None or any(k is None for k in cache.k):
        raise ValueError("past_key_values was never prefilled: run a forward with use_cache=True first")
    if cache.heads_first != heads_first:
        raise ValueError(f"past_key_values was filled for a {'heads-first' if cache.heads_first else 'slots-first'} "
                         f"backend; attention backend {backend_name!r} reads the other layout: prefill again with it")


def chunk_layout(layout: Layout, cache: PmodCache, context: int) -> Layout:
    """The chunk's layout with positions continuing each row's sequence: [N] = cache.positions[row] + slot."""
    past = cache.positions.tolist()  # host: one sync per chunk, not per layer
    longest = max(p + n for p, n in zip(past, layout.varlen.lens))
    if longest > context:
        raise ValueError(f"cached prefix + new tokens reach {longest} positions, more than the model's context of "
                         f"{context} tokens")
    offset = cache.positions.to(layout.position_ids.device)
    shift = offset[layout.varlen.row]  # [N]
    rope = None if layout.rope_positions is None else layout.rope_positions + shift  # M-RoPE [3, N]: every axis moves on
    nxt = None if layout.next_positions is None else [p + n for p, n in zip(past, layout.next_positions)]
    return dataclasses.replace(layout, position_ids=layout.position_ids + shift, rope_positions=rope, next_positions=nxt)


def advance_positions(cache: PmodCache, layout: Layout) -> None:
    """After the chunk: each row's next position moves on by its new tokens (all of them, kept or not), or to the
    layout's own next positions (M-RoPE, where an image advances the position by less than its token count)."""
    if layout.next_positions is not None:
        cache.positions = torch.tensor(layout.next_positions, dtype=torch.long).to(cache.positions.device)
    else:
        cache.positions = cache.positions + layout.varlen.seqlens.to(cache.positions.device)
