"""Decode steps replayed from CUDA graphs captured once per shape and reused across generate calls.

At batch 1 a 7B decode step is bound by the host that issues its kernels, not by the GPU (H200: 17-27 ms a
step for ours and for `transformers`, against a 6.6 ms floor of reading the weights; BENCHMARKS.md). A graph
issues the whole step in one call. A graph reads and writes fixed addresses, so the cache switches to its static
mode (`PmodCache.make_static`) over tensors that the model's pool keeps (`StaticKV`): each call copies its
prefill into them and replays the graph captured for its key, (rows, per-layer capacity buckets, dtype, device,
attention backend, cache layout, kernel backend); a new key captures (warm-up, capture, rewind by snapshot).
The step's own code is unchanged. Capture is injectable (`DecodeGraphs(capture=...)`): the CPU tests run the
pool with an eager stand-in that writes exactly what a replay writes.
Legend: B rows, L layers, S slots, G kv heads, D head dim, V vocab.
"""
from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pmod.attention import resolve_backend
from pmod.cache import PmodCache, StaticKV

__all__ = ["DecodeGraphs", "GraphedDecode", "capacity_bucket", "check_graphable", "decode_graphs", "graph_key"]


def capacity_bucket(need: int, granule: int = 256) -> int:
    """Slots to allocate for `need`: a multiple of `granule`, or of need's power of two / 8 above 8 * granule
    (at most 12.5 % unread slack, a handful of buckets per octave: nearby prompt lengths share a graph)."""
    if need < 1:
        raise ValueError(f"capacity_bucket: need={need}; expected >= 1")
    step = max(granule, 1 << max(need.bit_length() - 4, 0))
    return -(-need // step) * step


def graph_key(model, cache: PmodCache, steps: int, granule: int = 256) -> tuple:
    """What a captured decode graph depends on: rows, each layer's capacity bucket for `steps` more tokens, the
    cache's dtype, device and layout, the attention backend and the MoD kernel backend."""
    caps = tuple(capacity_bucket(max(n) + steps, granule) for n in cache.lengths)
    k = cache.k[0]
    backend = resolve_backend(model.attn_backend, model.device, model.dtype).name
    return (cache.batch_size, caps, k.dtype, k.device, backend, cache.heads_first, model.kernel_backend)


def static_kv(cache: PmodCache, caps: tuple[int, ...]) -> StaticKV:
    """Zeroed static tensors shaped like `cache` with `caps[i]` slots in layer i."""
    k0, B = cache.k[0], cache.batch_size
    G, D = k0.shape[3 - cache.slot_dim], k0.shape[3]
    shape = lambda cap: (B, G, cap, D) if cache.heads_first else (B, cap, G, D)  # noqa: E731
    dev = cache.positions.device
    return StaticKV(k=[t.new_zeros(shape(c)) for t, c in zip(cache.k, caps)], v=[t.new_zeros(shape(c)) for t, c in zip(cache.v, caps)],
                    seqlens=[torch.zeros(B, dtype=torch.long, device=s.device) for s in cache.seqlens],
                    positions=torch.zeros(B, dtype=torch.long, device=dev), rows=torch.arange(B, device=dev))


@dataclass
class _Entry:
    """One captured step: its static tensors, the token input it reads, `replay() -> logits [B, V]`."""

    static: StaticKV
    tokens: torch.Tensor  # [B] long
    replay: Callable[[], torch.Tensor]
    busy: bool = False


_WARMUP = 2  # eager steps before a capture (as torch.cuda.graphs asks)


def cuda_capture(model, cache: PmodCache, tokens: torch.Tensor, warmup: int = _WARMUP) -> Callable[[], torch.Tensor]:
    """Capture `model.decode_step(tokens, cache)` on a static cache; the cache is rewound afterwards."""
    snap = cache.snapshot()  # the warm-up and the capture write real slots and advance lengths: undone below
    side = torch.cuda.Stream()  # warm-up off the default stream, as torch.cuda.graphs asks
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            model.decode_step(tokens, cache)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        logits = model.decode_step(tokens, cache)
    cache.restore(snap)

    def replay() -> torch.Tensor:
        graph.replay()
        return logits

    return replay


def eager_capture(model, cache: PmodCache, tokens: torch.Tensor, warmup: int = _WARMUP) -> Callable[[], torch.Tensor]:
    """The CPU stand-in of `cuda_capture`: a replay runs the step eagerly over the capture-time cache object, whose
    tensors are the static ones, so it writes what a graph replay writes (host state is the caller's, as there)."""
    snap = cache.snapshot()
    for _ in range(warmup):
        model.decode_step(tokens, cache)
    cache.restore(snap)
    proxy = _Proxy(cache)
    return lambda: model.decode_step(tokens, proxy)


class _Proxy(PmodCache):
    """The capture-time view of a static cache: the same tensors, its own (ignored) host lengths."""

    def __init__(self, cache: PmodCache):
        self.__dict__.update(cache.__dict__)
        self.lengths, self.k, self.v, self.seqlens = [list(r) for r in cache.lengths], list(cache.k), list(cache.v), list(cache.seqlens)

    def advance_host(self) -> None:
        pass


class DecodeGraphs:
    """A model's pool of captured decode steps (LRU, at most `max_entries`): `acquire(cache, steps)` returns a
    `GraphedDecode` over the entry for the cache's key, capturing it the first time. `captures` counts captures."""

    def __init__(self, model, max_entries: int = 4, granule: int = 256,
                 capture: Callable[..., Callable[[], torch.Tensor]] = cuda_capture):
        self._model = weakref.ref(model)  # the pool lives beside the model, not inside it
        self.max_entries, self.granule, self.capture = max_entries, granule, capture
        self.entries: OrderedDict[tuple, _Entry] = OrderedDict()
        self.captures = 0
        self._weights: tuple = ()

    def acquire(self, cache: PmodCache, steps: int) -> "GraphedDecode":
        model = self._model()
        check_graphable(model, self.capture)
        sig = tuple(p.data_ptr() for p in model.parameters())  # graphs read weights by address: new tensors, new graphs
        if sig != self._weights:
            self.entries.clear()
            self._weights = sig
        steps = max(steps, _WARMUP)  # a capture's warm-up writes real slots too (rewound): room for them
        key = graph_key(model, cache, steps, self.granule)
        entry = self.entries.get(key)
        if entry is not None and entry.busy:  # in use by a call still running: this one captures its own
            return GraphedDecode(model, cache, steps, capture=self.capture)
        if entry is None:
            entry = self._build(model, cache, steps, key)
        else:
            self.entries.move_to_end(key)
            cache.make_static(steps, into=entry.static)  # copy the prefill in; the captured graph replays over it
        return GraphedDecode._over(cache, entry)

    def _build(self, model, cache: PmodCache, steps: int, key: tuple) -> _Entry:
        static = static_kv(cache, key[1])
        cache.make_static(steps, into=static)
        tokens = torch.zeros(cache.batch_size, dtype=torch.long, device=model.device)
        entry = _Entry(static, tokens, self.capture(model, cache, tokens))
        self.captures += 1
        self.entries[key] = entry
        while len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)
        return entry

    def clear(self) -> None:
        """Drop every graph and its static tensors (their memory is freed when no cache uses them)."""
        self.entries.clear()


_POOLS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def decode_graphs(model, **kwargs) -> DecodeGraphs:
    """The model's graph pool (made on first use; `kwargs` only then)."""
    pool = _POOLS.get(model)
    if pool is None:
        pool = _POOLS[model] = DecodeGraphs(model, **kwargs)
    return pool


def check_graphable(model, capture=cuda_capture) -> None:
    """Named errors before anything is captured: a CUDA device, an attention backend a graph can replay."""
    if capture is cuda_capture and model.device.type != "cuda":
        raise ValueError(f"CUDA graphs need the model on a CUDA device, not {model.device}")
    if resolve_backend(model.attn_backend, model.device, model.dtype).name == "flash":
        raise ValueError("CUDA-graph decode runs the SDPA or eager attention backend, not flash")


class GraphedDecode:
    """`step(tokens [B]) -> logits [B, V]`, the same as `model.decode_step(tokens, cache)`, for at least `steps` steps.

    Built directly, it captures its own graph (not pooled); `decode_graphs(model).acquire(cache, steps)` reuses the
    pool's. The returned logits live in the graph's output buffer: the next `step` overwrites them."""

    def __init__(self, model, cache: PmodCache, steps: int, warmup: int = 2, capture=cuda_capture):
        check_graphable(model, capture)
        caps = tuple(max(n) + max(steps, warmup) for n in cache.lengths)  # the warm-up writes real slots too (rewound)
        static = static_kv(cache, caps)
        cache.make_static(max(steps, warmup), into=static)
        tokens = torch.zeros(cache.batch_size, dtype=torch.long, device=model.device)
        self.cache, self.entry = cache, _Entry(static, tokens, capture(model, cache, tokens, warmup))
        self.entry.busy = True

    @classmethod
    def _over(cls, cache: PmodCache, entry: _Entry) -> "GraphedDecode":
        self = cls.__new__(cls)
        self.cache, self.entry = cache, entry
        entry.busy = True
        return self

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.cache.steps_left() < 1:  # a replay past the capacity would write out of bounds
            raise RuntimeError("GraphedDecode: the cache capacity reserved for this graph is used up")
        self.entry.tokens.copy_(tokens)
        logits = self.entry.replay()
        self.cache.advance_host()
        return logits

    def close(self, keep: bool = True) -> None:
        """Back to a dynamic cache (growing, host-sized views). `keep`: the cache is still used (returned, or the
        caller's): it gets its own tensors, as the graph's are replayed by later calls."""
        self.cache.make_dynamic(own=keep)
        self.entry.busy = False
