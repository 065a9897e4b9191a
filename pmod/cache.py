"""The reduced KV cache: each layer holds only the tokens it processed.

After a p-MoD prefill a dense layer holds every token of a row, a MoD layer only the row's text and
the vision tokens it kept (with RoPE applied at their original positions). Decode tokens are text:
they pass every layer, so each layer grows by one slot per step, while the next token's position
continues the FULL merged sequence. Positions and per-layer lengths are therefore tracked apart.

Lengths live on the host as well as on the device: the host copy sizes every view without a sync.
Legend: L layers, B rows, S slots, G kv heads, D head dim.
"""
from __future__ import annotations

import torch

from pmod.packing import Varlen

__all__ = ["PmodCache"]


class PmodCache:
    def __init__(self, num_layers: int, batch_size: int, reserve: int = 0):
        self.num_layers, self.batch_size, self.reserve = num_layers, batch_size, reserve
        self.k: list[torch.Tensor | None] = [None] * num_layers  # [B, S, G, D] each
        self.v: list[torch.Tensor | None] = [None] * num_layers
        self.lengths: list[list[int]] = [[0] * batch_size for _ in range(num_layers)]  # host
        self.seqlens: list[torch.Tensor | None] = [None] * num_layers  # [B] long, device of the layer
        self.positions: torch.Tensor | None = None  # [B] long: position id of the next token of each row

    # --- writes ---------------------------------------------------------------------------------
    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor, varlen: Varlen) -> None:
        """Prefill: k, v [N_l, G, D] of the packed tokens this layer processed."""
        B, (G, D) = self.batch_size, k.shape[1:]
        cap = varlen.max_seqlen + self.reserve
        kc, vc = k.new_zeros(B, cap, G, D), v.new_zeros(B, cap, G, D)
        kc[varlen.row, varlen.slot] = k.detach()
        vc[varlen.row, varlen.slot] = v.detach()
        self.k[layer], self.v[layer] = kc, vc
        self.lengths[layer] = list(varlen.lens)
        self.seqlens[layer] = torch.tensor(varlen.lens, dtype=torch.long).to(k.device, non_blocking=True)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decode: write k, v [B, G, D] at each row's next slot; return (k_cache, v_cache, seqlens) views."""
        if self.k[layer] is None:
            raise RuntimeError(f"PmodCache: layer {layer} was never prefilled; run a prefill before decoding")
        need = max(self.lengths[layer]) + 1
        if need > self.k[layer].shape[1]:
            self._grow(layer, max(need, 2 * self.k[layer].shape[1]))
        rows = torch.arange(self.batch_size, device=k.device)
        self.k[layer][rows, self.seqlens[layer]] = k
        self.v[layer][rows, self.seqlens[layer]] = v
        self.seqlens[layer] = self.seqlens[layer] + 1
        self.lengths[layer] = [n + 1 for n in self.lengths[layer]]
        return self.k[layer][:, :need], self.v[layer][:, :need], self.seqlens[layer]

    def _grow(self, layer: int, cap: int) -> None:
        for store in (self.k, self.v):
            old = store[layer]
            new = old.new_zeros(old.shape[0], cap, *old.shape[2:])
            new[:, : old.shape[1]] = old
            store[layer] = new

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (e.g. to drop finished sequences from a batch)."""
        keep = rows.tolist()
        for i in range(self.num_layers):
            if self.k[i] is not None:
                self.k[i], self.v[i] = self.k[i][rows.to(self.k[i].device)], self.v[i][rows.to(self.v[i].device)]
                self.seqlens[i] = self.seqlens[i][rows.to(self.seqlens[i].device)]
                self.lengths[i] = [self.lengths[i][r] for r in keep]
        if self.positions is not None:
            self.positions = self.positions[rows.to(self.positions.device)]
        self.batch_size = len(keep)

    # --- reports --------------------------------------------------------------------------------
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
            out.append(0 if k is None else 2 * sum(self.lengths[i]) * k.shape[2] * k.shape[3] * k.element_size())
        return out

    def nbytes(self) -> int:
        return sum(self.layer_nbytes())

    def allocated_nbytes(self) -> int:
        return sum(2 * k.numel() * k.element_size() for k in self.k if k is not None)

    def __len__(self) -> int:
        return self.num_layers

    def __repr__(self) -> str:
        return f"PmodCache(layers={self.num_layers}, rows={self.batch_size}, nbytes={self.nbytes()})"
