"""What a `PmodCache` holds, as numbers: tokens and bytes per layer (a mixin of `PmodCache`)."""
from __future__ import annotations

import torch

__all__ = ["CacheReports"]


class CacheReports:
    """Needs `num_layers`, `batch_size`, `k`, `lengths`, `slot_dim` (see `PmodCache`)."""

    def layer_lengths(self) -> list[int] | torch.Tensor:
        """Tokens held per layer: list[int] for one row, else LongTensor [L, B]."""
        if self.batch_size == 1:
            return [row[0] for row in self.lengths]
        return torch.tensor(self.lengths, dtype=torch.long)

    def layer_nbytes(self) -> list[int]:
        """Bytes held per layer (keys + values of the tokens stored, not the spare capacity)."""
        out = []
        for i in range(self.num_layers):
            k = self.k[i]
            out.append(0 if k is None else sum(self.lengths[i]) * self.token_nbytes(i))
        return out

    def token_nbytes(self, layer: int) -> int:
        """Bytes one token takes in `layer` (keys + values over all kv heads)."""
        k = self.k[layer]
        return 2 * k.shape[3 - self.slot_dim] * k.shape[3] * k.element_size()  # G * D, read from the shape (B or S may be 0)

    def nbytes(self) -> int:
        return sum(self.layer_nbytes())

    def allocated_nbytes(self) -> int:
        return sum(2 * k.numel() * k.element_size() for k in self.k if k is not None)
