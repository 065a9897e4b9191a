"""Benchmark inputs (prompts with image placeholders) and the calls that are timed."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pmod.attention import resolve_backend
from pmod.cache import PmodCache
from pmod.config import PmodConfig
from pmod.modeling.block import AttnContext
from pmod.packing import IMAGE_TOKEN_INDEX


# ---------------------------------------------------------------------------------------------- inputs
@dataclass
class Prompt:
    """A batch: input_ids [B, T] (IMAGE_TOKEN_INDEX where images go), mask [B, T] or None, pixels [I, 3, S, S]."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    images: torch.Tensor | None
    n_vision: list[int]
    n_text: list[int]
    n_images: list[int]

    @property
    def merged_lens(self) -> list[int]:
        return [v + t for v, t in zip(self.n_vision, self.n_text)]


def make_prompt(config: PmodConfig, images: Sequence[int], n_text: int | Sequence[int], device: str, seed: int = 0,
                fill: bool = False) -> Prompt:
    """Rows of [BOS, text, <image> x images[b], text] with random ids, right-padded with a mask; `fill=True`
    instead appends random text so that every row has the same merged length (no mask: padded execution)."""
    g = torch.Generator().manual_seed(seed)
    n_text = [n_text] * len(images) if isinstance(n_text, int) else list(n_text)
    P, V = config.vision.num_patches, config.text.vocab_size
    rand = lambda n: torch.randint(3, V, (n,), generator=g).tolist()
    rows = [[1] + rand((t - 1) // 2) + [IMAGE_TOKEN_INDEX] * k + rand(t - 1 - (t - 1) // 2)
            for k, t in zip(images, n_text)]
    merged = [t + k * P for k, t in zip(images, n_text)]
    S = config.vision.image_size
    pixels = torch.randn(sum(images), 3, S, S, generator=g).to(device) if sum(images) else None
    if fill:  # drawn after the pixels, so a filled prompt holds the same rows and images as the plain one
        rows = [r + rand(max(merged) - m) for r, m in zip(rows, merged)]
        n_text = [t + max(merged) - m for t, m in zip(n_text, merged)]
    T = max(map(len, rows))
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, : len(r)], mask[b, : len(r)] = torch.tensor(r), 1
    return Prompt(ids, None if bool(mask.all()) else mask, pixels, [k * P for k in images], n_text, list(images))


# ---------------------------------------------------------------------------------------------- the measured calls
def prefill(model, prompt: Prompt, reserve: int = 0):
    """Generation's prefill (as `pmod.generate.generate` runs it): PmodOutput with the cache, last logits [B, V]."""
    return model(input_ids=prompt.input_ids, images=prompt.images, attention_mask=prompt.attention_mask,
                 use_cache=True, cache_reserve=reserve, logits_to_keep="last", output_routing=False)


def decode_loop(model, cache: PmodCache, logits: torch.Tensor, steps: int) -> torch.Tensor:
    """`steps` greedy decode steps from last logits [B, V]; no host sync. Returns the last tokens [B]."""
    tok = logits.argmax(-1)
    for _ in range(steps):
        tok = model.decode_step(tok, cache).argmax(-1)
    return tok


def replicate_rows(cache: PmodCache, batch: int) -> PmodCache:
    """A new cache holding `batch` copies of row 0 of `cache` (which is left untouched)."""
    c = copy.copy(cache)
    c.k, c.v, c.seqlens = list(cache.k), list(cache.v), list(cache.seqlens)
    c.lengths = [list(x) for x in cache.lengths]
    c.select_rows(torch.zeros(batch, dtype=torch.long))
    return c


def _snapshot(cache: PmodCache):
    return cache.snapshot()


def _rewind(cache: PmodCache, snap) -> None:
    """Back to the snapshot (`PmodCache.restore`): later slots are beyond every length, so they are never read."""
    cache.restore(snap)


def _decoder(model, x: torch.Tensor, layout) -> torch.Tensor:
    """Our decoder alone over packed x [N, C], no cache; route plans rebuilt as a fresh prefill would."""
    layout = dataclasses.replace(layout, _plans={})
    backend = resolve_backend(model.attn_backend, model.device)
    with backend.scope(x.device):
        return model.language_model(x, layout, AttnContext(backend, layout.varlen, None), record=False)[0]
