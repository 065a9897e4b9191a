"""Decode steps replayed from one CUDA graph, as gpt-fast does with `torch.compile(mode="reduce-overhead")`.

At batch 1 a 7B decode step is bound by the host that issues its kernels, not by the GPU (H200: 17-27 ms a
step for ours and for `transformers`, against a 6.6 ms floor of reading the weights; BENCHMARKS.md). A graph
issues the whole step in one call. The cache switches to its static mode (`PmodCache.make_static`) so that
each replay reads and writes the same memory; the step's own code is unchanged.
"""
from __future__ import annotations

import torch

from pmod.attention import resolve_backend
from pmod.cache import PmodCache

__all__ = ["GraphedDecode"]


class GraphedDecode:
    """`step(tokens [B]) -> logits [B, V]`, the same as `model.decode_step(tokens, cache)`, for at least `steps` steps.

    The returned logits live in the graph's output buffer: the next `step` overwrites them."""

    def __init__(self, model, cache: PmodCache, steps: int, warmup: int = 2):
        if model.device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on a CUDA device, not {model.device}")
        if resolve_backend(model.attn_backend, model.device, model.dtype).name == "flash":
            raise ValueError("CUDA-graph decode runs the SDPA or eager attention backend, not flash")
        self.model, self.cache = model, cache
        cache.make_static(max(steps, warmup))  # the warm-up steps write real slots too (then rewound)
        self.tokens = torch.zeros(cache.batch_size, dtype=torch.long, device=model.device)
        saved = ([list(r) for r in cache.lengths], [s.clone() for s in cache.seqlens], cache.positions.clone())

        side = torch.cuda.Stream()  # warm-up off the default stream, as torch.cuda.graphs asks
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                model.decode_step(self.tokens, cache)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = model.decode_step(self.tokens, cache)
        self._restore(saved)  # the warm-up ran and capture advanced the host lengths: undo both

    def _restore(self, saved) -> None:
        lengths, seqlens, positions = saved
        self.cache.lengths = lengths
        for s, s0 in zip(self.cache.seqlens, seqlens):
            s.copy_(s0)
        self.cache.positions.copy_(positions)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.cache.steps_left() < 1:  # a replay past the capacity would write out of bounds
            raise RuntimeError("GraphedDecode: the cache capacity reserved for this graph is used up")
        self.tokens.copy_(tokens)
        self.graph.replay()
        self.cache.advance_host()
        return self.logits

    def close(self) -> None:
        """Back to the dynamic cache (growing, host-sized views); the graph is dropped."""
        self.cache.static = False
        self.graph = None
