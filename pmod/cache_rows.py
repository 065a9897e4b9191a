"""Row operations of `PmodCache` (continuous batching: rows join and leave between decode steps).

A mixin, so that `PmodCache` keeps its methods; every operation here moves rows, so snapshots taken before it
no longer describe the cache (`_rows_changed`). None of them runs on a static cache (a CUDA graph replays its
tensors). Legend: B rows, S slots, G kv heads, D head dim.
"""
from __future__ import annotations

import torch

__all__ = ["CacheRows"]


class CacheRows:
    """select_rows, drop_rows, insert_rows, compact: in place, on a dynamic cache."""

    def _rows_changed(self) -> None:
        self._snaps = set()  # a new set (a shallow copy may share the old one): earlier snapshots are refused

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (e.g. to drop finished sequences from a batch)."""
        if self.static:
            raise RuntimeError("PmodCache.select_rows: this cache is static (a CUDA graph replays its tensors)")
        keep = rows.tolist()
        for i in range(self.num_layers):
            if self.k[i] is not None:
                self.k[i], self.v[i] = self.k[i][rows.to(self.k[i].device)], self.v[i][rows.to(self.v[i].device)]
                self.seqlens[i] = self.seqlens[i][rows.to(self.seqlens[i].device)]
                self.lengths[i] = [self.lengths[i][r] for r in keep]
        if self.positions is not None:
            self.positions = self.positions[rows.to(self.positions.device)]
        self.batch_size = len(keep)
        self._rows_changed()

    def drop_rows(self, rows) -> None:
        """Remove `rows` (indices into the current batch; finished or cancelled requests); the others keep their order."""
        gone = set(int(r) for r in rows)
        bad = [r for r in gone if not 0 <= r < self.batch_size]
        if bad:
            raise IndexError(f"PmodCache.drop_rows: row(s) {sorted(bad)} outside a batch of {self.batch_size}")
        keep = [r for r in range(self.batch_size) if r not in gone]
        device = self.positions.device if self.positions is not None else "cpu"
        self.select_rows(torch.tensor(keep, dtype=torch.long, device=device))

    def insert_rows(self, other: "CacheRows") -> None:
        """Append the rows of `other` (a fresh prefill) after this cache's rows, in place.

        Per layer the slot capacity becomes the larger of the two; the shorter side is zero-padded past its
        lengths (slots beyond a row's length are never read: attention masks them by `seqlens`)."""
        if self.static or other.static:
            raise RuntimeError("PmodCache.insert_rows: a static cache (CUDA graph) cannot change its rows")
        if other.num_layers != self.num_layers or other.heads_first != self.heads_first:
            raise ValueError(f"PmodCache.insert_rows: caches differ ({self.num_layers} vs {other.num_layers} layers, "
                             f"heads_first {self.heads_first} vs {other.heads_first})")
        if self.batch_size == 0:
            self._take(other)
            return
        for i in range(self.num_layers):
            if (self.k[i] is None) != (other.k[i] is None):
                raise RuntimeError(f"PmodCache.insert_rows: layer {i} is prefilled in only one of the caches")
            if self.k[i] is None:
                continue
            cap = max(self.k[i].shape[self.slot_dim], other.k[i].shape[self.slot_dim])
            for store, theirs in ((self.k, other.k), (self.v, other.v)):
                store[i] = torch.cat([self._padded(store[i], cap), self._padded(theirs[i], cap)])  # [B + b, ...]
            self.seqlens[i] = torch.cat([self.seqlens[i], other.seqlens[i].to(self.seqlens[i].device)])
            self.lengths[i] = self.lengths[i] + other.lengths[i]
        self.positions = torch.cat([self.positions, other.positions.to(self.positions.device)])
        self.batch_size += other.batch_size
        self._rows_changed()

    def compact(self, spare: int = 0) -> None:
        """Shrink each layer's slot capacity to its longest row + `spare` (after long rows have left)."""
        if self.static:
            raise RuntimeError("PmodCache.compact: this cache is static (a CUDA graph replays its tensors)")
        for i in range(self.num_layers):
            if self.k[i] is None:
                continue
            cap = max(self.lengths[i], default=0) + spare
            if cap < self.k[i].shape[self.slot_dim]:
                self.k[i] = self.k[i].narrow(self.slot_dim, 0, cap).clone()
                self.v[i] = self.v[i].narrow(self.slot_dim, 0, cap).clone()

    def _padded(self, t: torch.Tensor, cap: int) -> torch.Tensor:
        """`t` with its slot dimension zero-padded to `cap`."""
        extra = cap - t.shape[self.slot_dim]
        if extra == 0:
            return t
        shape = list(t.shape)
        shape[self.slot_dim] = extra
        return torch.cat([t, t.new_zeros(shape)], dim=self.slot_dim)

    def _take(self, other: "CacheRows") -> None:
        self.k, self.v, self.seqlens = list(other.k), list(other.v), list(other.seqlens)
        self.lengths = [list(x) for x in other.lengths]
        self.positions, self.batch_size, self.reserve = other.positions, other.batch_size, other.reserve
        self._rows_changed()
