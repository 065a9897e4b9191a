"""Packed layout of a multimodal batch: every real token of every row, end to end, no padding.

All sizes are worked out once on the host from `input_ids`, the attention mask and the number of
feature tokens of each image, so that the decoder's layers never sync with the device to learn a
length. Legend: B rows, T input length, M merged length (longest row after image features are
inserted), N packed tokens, Nt text tokens, Nv vision tokens, V vision slots per row, K kept.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["IMAGE_TOKEN_INDEX", "Varlen", "Layout", "RoutePlan", "build_layout", "plan_route", "plan_routes", "upload"]

IMAGE_TOKEN_INDEX = -200
IGNORE_INDEX = -100


def upload(arrays: dict[str, np.ndarray], device: torch.device | str) -> dict[str, torch.Tensor]:
    """Host int arrays -> device int64 tensors in ONE copy (pinned, non-blocking on CUDA), as views of one buffer.

    A MoD forward needs a dozen small index tensors per layer; one pageable copy each would cost a stream sync
    apiece on CUDA (the driver stages pageable memory), draining the GPU queue every layer.
    """
    dev = torch.device(device)
    flat = [np.asarray(a, dtype=np.int64).reshape(-1) for a in arrays.values()]
    buf = torch.from_numpy(np.concatenate(flat) if flat else np.zeros(0, np.int64))
    if dev.type == "cuda":
        buf = buf.pin_memory().to(dev, non_blocking=True)
    elif dev.type != "cpu":
        buf = buf.to(dev)
    out, start = {}, 0
    for (name, a), f in zip(arrays.items(), flat):
        t = buf[start : start + f.size]
        out[name] = t if np.ndim(a) == 1 else t.view(np.shape(a))  # no view op for the 1-D ones
        start += f.size
    return out


def _varlen_arrays(lens: list[int], prefix: str = "") -> dict[str, np.ndarray]:
    """Host arrays of a Varlen over `lens`: cumulative lengths, each token's row and slot."""
    lens_a = np.asarray(lens, dtype=np.int64)
    cu = np.concatenate([[0], np.cumsum(lens_a)]).astype(np.int64)
    row = np.repeat(np.arange(len(lens_a)), lens_a)  # [N]
    return {prefix + "lens": lens_a, prefix + "cu": cu, prefix + "row": row, prefix + "slot": np.arange(cu[-1]) - cu[row]}


@dataclass
class Varlen:
    """Variable-length sequences packed end to end (FlashAttention's varlen convention)."""

    lens: list[int]  # host, per row
    cu_seqlens: torch.Tensor  # [B+1] int32
    max_seqlen: int
    row: torch.Tensor  # [N] long, row of each packed token
    slot: torch.Tensor  # [N] long, index of each packed token within its row
    seqlens: torch.Tensor  # [B] long, lens on the device

    @property
    def total(self) -> int:
        return int(sum(self.lens))

    @classmethod
    def from_lens(cls, lens: list[int], device: torch.device | str) -> Varlen:
        return cls._from(lens, upload(_varlen_arrays(lens), device))

    @classmethod
    def _from(cls, lens: list[int], t: dict[str, torch.Tensor], prefix: str = "") -> Varlen:
        """From tensors already on the device (`upload` of `_varlen_arrays(lens, prefix)`, maybe among others)."""
        return cls(lens=list(lens), cu_seqlens=t[prefix + "cu"].to(torch.int32), max_seqlen=max(lens, default=0),
                   row=t[prefix + "row"], slot=t[prefix + "slot"], seqlens=t[prefix + "lens"])


@dataclass
class RoutePlan:
    """What one MoD layer keeps, decided before its router runs: k per row and the packed sizes."""

    ratio: float
    k: list[int]  # host, per row
    k_dev: torch.Tensor  # [B] long
    k_max: int
    varlen: Varlen  # the kept tokens (text + top-k vision) of each row, packed
    uniform: bool  # every row has the same vision count and keeps the same k: no padded slot, none unchosen


@dataclass
class Layout:
    """Where every token of a batch lives: in the input, in the packed sequence, in the merged output."""

    batch_size: int
    merged_len: int  # M
    n_vision: list[int]  # host, per row
    varlen: Varlen  # all real tokens
    position_ids: torch.Tensor  # [N] long, 0.. per row (padding-side independent)
    vision_mask: torch.Tensor  # [N] bool
    text_src: torch.Tensor  # [Nt] long, flat index into the [B, T] inputs
    text_dest: torch.Tensor  # [Nt] long, packed index
    vision_dest: torch.Tensor  # [Nv] long, packed index, in image-feature order
    vision_slots: torch.Tensor  # [B, V] long, packed index of each row's vision tokens, N where padded
    vision_valid: torch.Tensor  # [B, V] bool
    vision_flat: torch.Tensor  # [Nv] long, flat index into [B, V] of each vision token
    out_index: torch.Tensor  # [N] long, flat index into the [B, M] merged output
    left_padded: bool
    _plans: dict  # memoised per-layout results: route plans by ratio, the merged mask
    rope_positions: torch.Tensor | None = None  # [3, N] long, M-RoPE (t, h, w) positions (Qwen2.5-VL), else None
    next_positions: list[int] | None = None  # host, per row: the first decode position when it is not the row length
    inject: dict | None = None  # {layer: [Nv, C]} added to the vision tokens after that layer (Qwen3-VL's DeepStack)

    @property
    def num_tokens(self) -> int:
        return self.varlen.total

    @property
    def has_vision(self) -> bool:
        return sum(self.n_vision) > 0

    def route(self, ratio: float) -> RoutePlan:
        if ratio not in self._plans:
            self._plans[ratio] = plan_route(self, ratio)
        return self._plans[ratio]

    def prepare_routes(self, ratios) -> None:
        """Plan every MoD layer's route at once (one host-to-device copy for all of them); `route` then finds them."""
        todo = sorted({r for r in ratios if r not in self._plans})
        if todo and self.has_vision:
            self._plans.update(plan_routes(self, todo))

    def pad(self, packed: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """[N, ...] packed -> [B, M, ...] merged, padding on the input's side."""
        out = packed.new_full((self.batch_size * self.merged_len, *packed.shape[1:]), fill)
        out = out.index_copy(0, self.out_index, packed)
        return out.view(self.batch_size, self.merged_len, *packed.shape[1:])

    def text_keep(self) -> torch.Tensor:
        """[N + 1] bool: True on text tokens, False on vision tokens and on a trailing sink slot (index N) that
        routing scatters its unchosen slots into. The start of every MoD layer's keep mask; memoised."""
        if "text_keep" not in self._plans:
            self._plans["text_keep"] = torch.cat([~self.vision_mask, self.vision_mask.new_zeros(1)])
        return self._plans["text_keep"]

    def merged_mask(self) -> torch.Tensor:
        """[B, M] bool, True on real tokens of the merged sequence (built once per layout)."""
        if "merged_mask" not in self._plans:
            ones = torch.ones(self.num_tokens, dtype=torch.bool, device=self.position_ids.device)
            self._plans["merged_mask"] = self.pad(ones, False)
        return self._plans["merged_mask"]


def build_layout(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    image_token_counts: list[int],
    device: torch.device | str,
    max_length: int | None = None,
) -> Layout:
    """Lay out a batch whose `input_ids` [B, T] hold IMAGE_TOKEN_INDEX where image features go.

    `image_token_counts[i]` is the number of feature tokens of the i-th image (images are consumed
    in row-major order of their placeholders, as LLaVA does). Padding (mask 0) is dropped.
    """
    ids = input_ids.detach().cpu().numpy()  # host copy once, at the input stage
    B, T = ids.shape
    mask = np.ones_like(ids, dtype=bool) if attention_mask is None else attention_mask.detach().cpu().numpy().astype(bool)
    is_img = (ids == IMAGE_TOKEN_INDEX) & mask
    n_placeholders = int(is_img.sum())
    if n_placeholders != len(image_token_counts):
        raise ValueError(
            f"input_ids hold {n_placeholders} image placeholder(s) ({IMAGE_TOKEN_INDEX}) but {len(image_token_counts)} "
            f"image(s) were given; pass exactly one image per placeholder"
        )
    counts = np.asarray(image_token_counts, dtype=np.int64)

    # Length of every input token once expanded: 1 for text, the image's feature count for a placeholder.
    expand = np.where(mask, 1, 0).astype(np.int64)
    expand[is_img] = counts  # row-major order = image order
    lens = expand.sum(1)  # [B]
    if max_length is not None and lens.max(initial=0) > max_length:
        worst = int(lens.argmax())
        raise ValueError(
            f"row {worst} is {int(lens[worst])} tokens long once image features are inserted, more than the model's "
            f"maximum of {max_length}; shorten the prompt or use fewer/smaller images"
        )
    if (lens == 0).any():
        raise ValueError(f"rows {np.nonzero(lens == 0)[0].tolist()} have no real tokens (attention_mask is all 0)")
    row_start = np.concatenate([[0], np.cumsum(lens)[:-1]])
    start = np.cumsum(expand, axis=1) - expand + row_start[:, None]  # packed index of each input token's first slot

    text = mask & ~is_img
    text_src = np.flatnonzero(text)  # flat [B*T] index, row-major
    text_dest = start[text]
    vision_dest = np.concatenate([np.arange(s, s + c) for s, c in zip(start[is_img], counts)] or [np.zeros(0, np.int64)])
    n_vision = np.bincount(np.nonzero(is_img)[0], weights=counts, minlength=B).astype(np.int64).tolist()

    N = int(lens.sum())
    vision_mask = np.zeros(N, dtype=bool)
    vision_mask[vision_dest] = True
    row = np.repeat(np.arange(B), lens)
    pos = np.arange(N) - row_start[row]
    left_padded = attention_mask is not None and bool((~mask[:, 0]).any()) and bool(mask[:, -1].all())
    M = int(lens.max())
    out_index = row * M + (pos + (M - lens[row]) if left_padded else pos)

    V = max(n_vision, default=0)
    vision_slots = np.full((B, V), N, dtype=np.int64)
    vrow = row[vision_dest]
    vcol = np.arange(len(vision_dest)) - np.concatenate([[0], np.cumsum(n_vision)[:-1]])[vrow]
    vision_slots[vrow, vcol] = vision_dest

    t = upload({"pos": pos, "vision_mask": vision_mask, "text_src": text_src, "text_dest": text_dest,
                "vision_dest": vision_dest, "vision_slots": vision_slots, "vision_flat": vrow * V + vcol,
                "out_index": out_index, **_varlen_arrays(lens.tolist(), "v_")}, device)
    return Layout(
        batch_size=B,
        merged_len=M,
        n_vision=n_vision,
        varlen=Varlen._from(lens.tolist(), t, "v_"),
        position_ids=t["pos"],
        vision_mask=t["vision_mask"].bool(),
        text_src=t["text_src"],
        text_dest=t["text_dest"],
        vision_dest=t["vision_dest"],
        vision_slots=t["vision_slots"],
        vision_valid=t["vision_slots"] < N,
        vision_flat=t["vision_flat"],
        out_index=t["out_index"],
        left_padded=left_padded,
        _plans={},
    )


def plan_route(layout: Layout, ratio: float) -> RoutePlan:
    """Host-side sizes of a MoD layer at `ratio`: k = trunc(n_vision * ratio) per row (float32, as official)."""
    return plan_routes(layout, [ratio])[ratio]


def plan_routes(layout: Layout, ratios) -> dict[float, RoutePlan]:
    """`plan_route` for several ratios, their index tensors uploaded together in one copy."""
    from pmod.schedule import kept_count

    arrays, sizes = {}, {}
    for i, ratio in enumerate(dict.fromkeys(ratios)):  # each ratio once, in order
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"MoD ratio must be in (0, 1], got {ratio}")
        k = [kept_count(n, ratio) for n in layout.n_vision]
        lens = [n - v + kk for n, v, kk in zip(layout.varlen.lens, layout.n_vision, k)]
        sizes[ratio] = (k, lens)
        arrays.update({f"{i}k": np.asarray(k, dtype=np.int64), **_varlen_arrays(lens, f"{i}_")})
    t = upload(arrays, layout.position_ids.device)
    same_v = len(set(layout.n_vision)) <= 1
    return {ratio: RoutePlan(ratio=ratio, k=k, k_dev=t[f"{i}k"], k_max=max(k, default=0), varlen=Varlen._from(lens, t, f"{i}_"),
                             uniform=same_v and len(set(k)) <= 1)
            for i, (ratio, (k, lens)) in enumerate(sizes.items())}
