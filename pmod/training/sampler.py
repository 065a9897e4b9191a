"""Which samples go into which micro-batch on which rank: deterministic, resumable, grouped.

Why our own sampler rather than accelerate's sharded DataLoader: resuming must land on exactly the
micro-batch after the checkpoint, on every rank, and "two processes with batch b" must see exactly the
rows of "one process with batch 2b". So the order is a pure function of (seed, epoch): the data are
cut into *global* micro-batches of `world_size x per_device_batch_size` rows, rank r takes the r-th
slice of each, and the position in the stream is one integer, saved with each checkpoint.

Grouping follows LLaVA's `group_by_modality_length`: image and text-only samples never share a
micro-batch (so every rank runs the vision tower, or none does), and within a modality each global
micro-batch holds samples of similar length, sorted longest first (less padding, balanced ranks).
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

__all__ = ["global_batches", "BatchStream", "LocalBatches", "rank_slice"]


def _chunks(idx: np.ndarray, size: int) -> list[list[int]]:
    return [idx[i : i + size].tolist() for i in range(0, len(idx), size)]


def global_batches(lengths: list[int], has_image: list[bool], global_size: int, seed: int, epoch: int,
                   group: bool = True, min_size: int = 1) -> list[list[int]]:
    """The global micro-batches of one epoch. Partial batches smaller than `min_size` (the world size:
    every rank needs a row) are dropped; other partial batches are kept."""
    rng = np.random.default_rng([seed, epoch])
    n = len(lengths)
    if not group:
        batches = _chunks(rng.permutation(n), global_size)
    else:
        lengths_a = np.asarray(lengths)
        batches, tails = [], []
        for modality in (True, False):
            idx = np.flatnonzero(np.asarray(has_image, dtype=bool) == modality)
            idx = idx[rng.permutation(len(idx))]
            chunks = _chunks(idx, global_size)
            # each chunk sorted longest first; a stable sort keeps the permutation's order among ties
            chunks = [sorted(c, key=lambda i: -lengths_a[i]) for c in chunks]
            if chunks and len(chunks[-1]) < global_size:
                tails.append(chunks.pop())
            batches.extend(chunks)
        batches = [batches[i] for i in rng.permutation(len(batches))] + tails  # LLaVA keeps partial ones last
    return [b for b in batches if len(b) >= min_size]


def rank_slice(batch: list[int], rank: int, world: int) -> list[int]:
    """Rank r's rows of a global micro-batch: contiguous, as even as possible (full batches: exactly equal)."""
    per, extra = divmod(len(batch), world)
    start = rank * per + min(rank, extra)
    return batch[start : start + per + (rank < extra)]


@dataclass
class BatchStream:
    """The endless stream of global micro-batches over epochs; `position` indexes it."""

    lengths: list[int]
    has_image: list[bool]
    global_size: int
    seed: int
    group: bool
    world: int

    def __post_init__(self) -> None:
        self._cache: dict[int, list[list[int]]] = {}
        self.per_epoch = len(self.epoch(0))
        if self.per_epoch == 0:
            raise ValueError(f"{len(self.lengths)} sample(s) cannot fill one micro-batch across {self.world} process(es)")

    def epoch(self, e: int) -> list[list[int]]:
        if e not in self._cache:
            self._cache = {e: global_batches(self.lengths, self.has_image, self.global_size, self.seed, e, self.group, self.world)}
        return self._cache[e]

    def at(self, position: int) -> list[int]:
        e, i = divmod(position, self.per_epoch)
        return self.epoch(e)[i]


class LocalBatches:
    """A DataLoader `batch_sampler`: this rank's index lists for positions [start, stop)."""

    def __init__(self, stream: BatchStream, rank: int, start: int, stop: int):
        self.stream, self.rank, self.start, self.stop = stream, rank, start, stop

    def __len__(self) -> int:
        return max(self.stop - self.start, 0)

    def __iter__(self) -> Iterator[list[int]]:
        for p in range(self.start, self.stop):
            yield rank_slice(self.stream.at(p), self.rank, self.stream.world)
