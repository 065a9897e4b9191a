"""The reduced KV cache: each layer holds only the tokens it processed.

After a p-MoD prefill a dense layer holds every token of a row, a MoD layer only the row's text and
the vision tokens it kept (with RoPE applied at their original positions). Decode tokens are text:
they pass every layer, so each layer grows by one slot per step, while the next token's position
continues the FULL merged sequence. Positions and per-layer lengths are therefore tracked apart.

Lengths live on the host as well as on the device: the host copy sizes every view without a sync.
The storage layout follows the attention backend that reads it: [B, S, G, D] for flash-attn's
KV-cache kernel, heads first [B, G, S, D] for SDPA, whose kernels want contiguous per-head slabs
(reading a transposed cache costs SDPA a copy of the whole cache every step).
Legend: L layers, B rows, S slots, G kv heads, D head dim.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from pmod.cache_report import CacheReports
from pmod.cache_rows import CacheRows
from pmod.cache_static import StaticKV, load_static
from pmod.packing import Varlen

__all__ = ["CacheSnapshot", "PmodCache", "StaticKV"]

_SNAP_IDS = itertools.count()


@dataclass(frozen=True)
class CacheSnapshot:
    """What `PmodCache.restore` rewinds to: lengths (host), seqlens and positions (device), no KV."""

    seq: int  # unique over all caches: a snapshot restores only into the cache (and line of history) it came from
    lengths: tuple[tuple[int, ...], ...]  # [L][B]
    seqlens: tuple[torch.Tensor | None, ...]  # [L] of [B] long
    positions: torch.Tensor | None  # [B] long


class PmodCache(CacheRows, CacheReports):
    def __init__(self, num_layers: int, batch_size: int, reserve: int = 0, heads_first: bool = False):
        self.num_layers, self.batch_size, self.reserve = num_layers, batch_size, reserve
        self.heads_first = heads_first
        self.k: list[torch.Tensor | None] = [None] * num_layers  # [B, S, G, D] each, or [B, G, S, D] if heads_first
        self.v: list[torch.Tensor | None] = [None] * num_layers
        self.lengths: list[list[int]] = [[0] * batch_size for _ in range(num_layers)]  # host
        self.seqlens: list[torch.Tensor | None] = [None] * num_layers  # [B] long, device of the layer
        self.positions: torch.Tensor | None = None  # [B] long: position id of the next token of each row
        self.static = False  # see make_static
        self._rows: torch.Tensor | None = None
        self._snaps: set[int] = set()  # snapshots this cache can restore (see restore)

    @property
    def slot_dim(self) -> int:
        return 2 if self.heads_first else 1

    def slots(self, t: torch.Tensor) -> torch.Tensor:
        """A stored k or v as a [B, S, G, D] view, whatever the storage layout."""
        return t.transpose(1, 2) if self.heads_first else t

    def layer_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(k, v) of one layer as [B, S, G, D] views of the filled slots (up to the longest row)."""
        n = max(self.lengths[layer])
        return self.slots(self.k[layer])[:, :n], self.slots(self.v[layer])[:, :n]

    def _empty(self, like: torch.Tensor, cap: int, G: int, D: int) -> torch.Tensor:
        return like.new_zeros((self.batch_size, G, cap, D) if self.heads_first else (self.batch_size, cap, G, D))

    # --- writes ---------------------------------------------------------------------------------
    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor, varlen: Varlen) -> None:
        """Prefill: k, v [N_l, G, D] of the packed tokens this layer processed."""
        cap = varlen.max_seqlen + self.reserve
        G, D = k.shape[1:]
        kc, vc = self._empty(k, cap, G, D), self._empty(v, cap, G, D)
        self.slots(kc)[varlen.row, varlen.slot] = k.detach()
        self.slots(vc)[varlen.row, varlen.slot] = v.detach()
        self.k[layer], self.v[layer] = kc, vc
        self.lengths[layer] = list(varlen.lens)
        self.seqlens[layer] = varlen.seqlens

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
        """Decode: write k, v [B, G, D] at each row's next slot. Returns (k_cache, v_cache, seqlens, uniform):
        views of the filled slots in the storage layout, lengths [B] after the write, and whether every
        row has the same length (then no slot of the views is padding and attention needs no mask)."""
        if self.k[layer] is None:
            raise RuntimeError(f"PmodCache: layer {layer} was never prefilled; run a prefill before decoding")
        lens = self.lengths[layer]
        if self.static:
            return self._append_static(layer, k, v)
        lo, hi = min(lens), max(lens)
        need = hi + 1
        if need > self.k[layer].shape[self.slot_dim]:
            self._grow(layer, max(need, 2 * self.k[layer].shape[self.slot_dim]))
        if lo == hi:  # one host-known slot for every row: a plain strided copy, no index tensors
            self.k[layer].select(self.slot_dim, hi).copy_(k)
            self.v[layer].select(self.slot_dim, hi).copy_(v)
        else:
            kc, vc = self.slots(self.k[layer]), self.slots(self.v[layer])
            rows = torch.arange(self.batch_size, device=k.device)
            kc[rows, self.seqlens[layer]] = k
            vc[rows, self.seqlens[layer]] = v
        self.seqlens[layer] = self._bumped(self.seqlens[layer])
        self.lengths[layer] = [n + 1 for n in lens]
        k_all, v_all = self.k[layer].narrow(self.slot_dim, 0, need), self.v[layer].narrow(self.slot_dim, 0, need)
        return k_all, v_all, self.seqlens[layer], lo == hi

    def append_in_kernel(self, layer: int, attend):
        """Decode where the attention kernel writes the new slot itself (flash_attn_with_kvcache(k=, v=)):
        `attend(k_store, v_store, seqlens)` gets the layer's whole storage, with room for one more slot, and the
        device lengths [B] before the write; the lengths then advance as `append`'s do. Returns attend's result."""
        if self.k[layer] is None:
            raise RuntimeError(f"PmodCache: layer {layer} was never prefilled; run a prefill before decoding")
        need = max(self.lengths[layer]) + 1
        if not self.static and need > self.k[layer].shape[self.slot_dim]:
            self._grow(layer, max(need, 2 * self.k[layer].shape[self.slot_dim]))
        out = attend(self.k[layer], self.v[layer], self.seqlens[layer])
        if self.static:
            self.seqlens[layer].add_(1)
        else:
            self.seqlens[layer] = self._bumped(self.seqlens[layer])
        self.lengths[layer] = [n + 1 for n in self.lengths[layer]]
        return out

    def _bumped(self, seqlens: torch.Tensor) -> torch.Tensor:
        """seqlens + 1 as a new tensor (callers may hold the old one: bench rewinds), computed once per step for
        the layers that share a lengths tensor (every dense layer, every MoD layer of one ratio)."""
        memo = self.__dict__.setdefault("_bump_memo", {})
        hit = memo.get(id(seqlens))
        if hit is not None and hit[0] is seqlens:
            return hit[1]
        if len(memo) > 4 * self.num_layers:  # entries of past steps: their old tensors are not asked for again
            memo.clear()
        new = seqlens + 1
        memo[id(seqlens)] = (seqlens, new)
        return new

    # --- snapshots ------------------------------------------------------------------------------
    def snapshot(self) -> CacheSnapshot:
        """A point to rewind to (`restore`): lengths, seqlens and positions, no KV copy (slots past a length are
        never read, and later writes land past every length). Static mode clones its in-place tensors (once here,
        not per step); a dynamic cache replaces those tensors instead of writing them, so they are kept by reference."""
        keep = (lambda t: None if t is None else t.clone()) if self.static else (lambda t: t)
        snap = CacheSnapshot(next(_SNAP_IDS), tuple(tuple(r) for r in self.lengths), tuple(keep(t) for t in self.seqlens),
                             keep(self.positions))
        self._snaps.add(snap.seq)
        return snap

    def restore(self, snap: CacheSnapshot) -> None:
        """Rewind to `snap`, the one way to rewind a cache. The mode stays: a static cache is updated in place (a
        captured graph keeps reading the same tensors). Refused when the KV below the snapshot's lengths may have
        changed: rows moved since, another cache's snapshot, or one taken after a snapshot restored since."""
        if snap.seq not in self._snaps:
            raise ValueError("PmodCache.restore: this snapshot does not describe this cache (another cache's, rows "
                             "moved since, or taken after a snapshot that was restored since)")
        if any(n < m for row, old in zip(self.lengths, snap.lengths) for n, m in zip(row, old)):
            raise ValueError("PmodCache.restore: the cache is shorter than the snapshot; it can only rewind")
        self._snaps = {s for s in self._snaps if s <= snap.seq}  # later snapshots describe writes about to be overwritten
        self.lengths = [list(r) for r in snap.lengths]
        if self.static:
            for s, s0 in zip(self.seqlens, snap.seqlens):
                s.copy_(s0)
            self.positions.copy_(snap.positions)
        else:
            self.seqlens, self.positions = list(snap.seqlens), snap.positions

    # --- static mode (CUDA graphs) ---------------------------------------------------------------
    def make_static(self, steps: int, into: StaticKV | None = None) -> None:
        """Fix every tensor's address and shape for `steps` more decode steps (what a CUDA graph replays):
        capacity for them now, slots addressed by the device lengths, lengths and positions advanced in
        place, attention over the whole capacity with a length mask. Host lengths then follow through
        `advance_host`, called once per replayed step. `into`: tensors kept by a graph pool, loaded with this
        cache's contents (its never-written slots zeroed) and adopted, so that an earlier capture replays here."""
        for i in range(self.num_layers):
            if self.k[i] is None:
                raise RuntimeError(f"PmodCache: layer {i} was never prefilled; run a prefill before decoding")
        if into is not None:
            load_static(self, steps, into)
            return
        for i in range(self.num_layers):
            need = max(self.lengths[i]) + steps
            if need > self.k[i].shape[self.slot_dim]:
                self._grow(i, need)
            self.seqlens[i] = self.seqlens[i].clone()  # owned: updated in place from now on
        self.positions = self.positions.clone()
        self._rows = torch.arange(self.batch_size, device=self.positions.device)
        self.static = True

    def make_dynamic(self, own: bool = True) -> None:
        """Back from static mode: the cache grows again. `own=True` copies tensors it may share (a graph pool's) into
        its own, so that a later capture or replay cannot overwrite what the caller keeps."""
        if own and self.static:
            n = [max(r) for r in self.lengths]
            self.k = [self._resized(t, m, m + self.reserve) for t, m in zip(self.k, n)]
            self.v = [self._resized(t, m, m + self.reserve) for t, m in zip(self.v, n)]
            self.seqlens, self.positions = [t.clone() for t in self.seqlens], self.positions.clone()
        self.static = False

    def steps_left(self) -> int:
        """Decode steps that still fit the allocated capacity of every layer."""
        return min(self.k[i].shape[self.slot_dim] - max(self.lengths[i]) for i in range(self.num_layers))

    def advance_positions(self) -> None:
        """After a decode step: the next token's position, in place in static mode (the captured tensor)."""
        if self.static:
            self.positions.add_(1)
        else:
            self.positions = self.positions + 1  # a new tensor: callers may hold the old one (bench rewinds)

    def advance_host(self) -> None:
        """Host lengths after a step that ran without Python (a CUDA graph replay)."""
        self.lengths = [[n + 1 for n in row] for row in self.lengths]

    def _append_static(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        kc, vc = self.slots(self.k[layer]), self.slots(self.v[layer])
        rows = self._rows.to(k.device)
        kc[rows, self.seqlens[layer]] = k  # device-side slot of each row: no host value baked into a graph
        vc[rows, self.seqlens[layer]] = v
        self.seqlens[layer].add_(1)
        self.lengths[layer] = [n + 1 for n in self.lengths[layer]]
        return self.k[layer], self.v[layer], self.seqlens[layer], False  # full capacity, masked by seqlens

    def _grow(self, layer: int, cap: int) -> None:
        for store in (self.k, self.v):
            store[layer] = self._resized(store[layer], max(self.lengths[layer]), cap)

    def _resized(self, old: torch.Tensor, filled: int, cap: int) -> torch.Tensor:
        """`old` with `cap` slots: its first `filled` copied, the rest zero (one write per element, not two)."""
        view = self.slots(old)  # [B, S, G, D]
        B, _, G, D = view.shape
        new = old.new_empty((B, G, cap, D) if self.heads_first else (B, cap, G, D))
        self.slots(new)[:, :filled] = view[:, :filled]
        self.slots(new)[:, filled:].zero_()  # never-written slots are zero: static mode reads them under a mask
        return new

    # --- continuation (pmod.modeling.chunk) -----------------------------------------------------
    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor, varlen: Varlen) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """A chunk after the cached prefix: write k, v [N_l, G, D] (the packed new tokens this layer processed,
        `varlen` their rows) after each row's filled slots. Returns (k_cache, v_cache, past): views of the
        filled slots in the storage layout and each row's length before the write (host)."""
        if self.k[layer] is None:
            raise RuntimeError(f"PmodCache: layer {layer} was never prefilled; run a prefill before continuing")
        if self.static:
            raise RuntimeError("PmodCache.extend: this cache is static (a CUDA graph replays its tensors); use a copy()")
        past = self.lengths[layer]
        new = [p + n for p, n in zip(past, varlen.lens)]
        need = max(new)
        if need > self.k[layer].shape[self.slot_dim]:
            self._grow(layer, need + self.reserve)
        offset = torch.tensor(past, dtype=torch.long).to(varlen.slot.device, non_blocking=True)  # [B]
        dest = offset[varlen.row] + varlen.slot  # [N_l] slot of each new token in its row
        self.slots(self.k[layer])[varlen.row, dest] = k.detach()
        self.slots(self.v[layer])[varlen.row, dest] = v.detach()
        self.lengths[layer] = new
        self.seqlens[layer] = self.seqlens[layer] + varlen.seqlens.to(self.seqlens[layer].device)
        k_all = self.k[layer].narrow(self.slot_dim, 0, need)
        return k_all, self.v[layer].narrow(self.slot_dim, 0, need), past

    def copy(self, spare: int | None = None) -> PmodCache:
        """An independent cache with the same contents: continue one prefix several ways, each from its own copy.
        `spare=None` keeps the capacity; `spare=n` sizes each layer to its filled slots + n (the chunk and the
        decode steps to come: no reallocation later). A static cache copies as a dynamic one."""
        out = PmodCache(self.num_layers, self.batch_size, reserve=self.reserve, heads_first=self.heads_first)
        clone = lambda t: None if t is None else t.clone()
        for i in range(self.num_layers):
            if self.k[i] is None or spare is None:
                out.k[i], out.v[i] = clone(self.k[i]), clone(self.v[i])
            else:
                n = max(self.lengths[i])
                out.k[i], out.v[i] = self._resized(self.k[i], n, n + spare), self._resized(self.v[i], n, n + spare)
        out.seqlens = [clone(t) for t in self.seqlens]
        out.lengths = [list(row) for row in self.lengths]
        out.positions = clone(self.positions)
        return out

    def __len__(self) -> int:
        return self.num_layers

    def __repr__(self) -> str:
        return f"PmodCache(layers={self.num_layers}, rows={self.batch_size}, nbytes={self.nbytes()})"
