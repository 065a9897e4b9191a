"""A prefix cache: reduced caches of prompt prefixes (image + the text before it), reused across requests.

Benchmarks that ask several questions about one image (POPE, MME: 2-6 per image), a chat server's
conversations, and repeated prompts all prefill the same image again. A request is split after its
last image placeholder: the prefix (system prompt, image, ...) is prefilled once and kept here, keyed
by a hash of the images' pixel bytes and the prefix's token ids; a later request with the same key
continues a copy of it with its own suffix (`generate(..., past_key_values=copy)`), which equals
prefilling the whole prompt (PMOD_SPEC §5; tests/test_continuation.py). Bounded in bytes, least
recently used out first; hits, misses and evictions are counted for logs and metrics.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import torch

from pmod.cache import PmodCache
from pmod.packing import IMAGE_TOKEN_INDEX

__all__ = ["PrefixCache", "PrefixStats", "image_digest", "prefix_key", "split_prefix", "continue_prefix"]


def image_digest(pixels: torch.Tensor) -> str:
    """sha256 of one image's pixel values as the model sees them (dtype, shape and bytes)."""
    t = pixels.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def prefix_key(image_digests: list[str], prefix_ids: list[int], salt: str = "") -> str:
    """The cache key of a prefix: its images (in order) and its token ids; `salt` names anything else that
    changes the cache (the model, its dtype, the attention backend's cache layout)."""
    h = hashlib.sha256(salt.encode())
    for d in image_digests:
        h.update(d.encode())
    h.update(b"|" + ",".join(map(str, prefix_ids)).encode())
    return h.hexdigest()


def split_prefix(ids: list[int]) -> int:
    """Where a prompt's cacheable prefix ends: after its last image placeholder (0: no image, nothing to reuse).
    The suffix (the question) is what every request adds; it keeps at least one token."""
    last = max((i for i, t in enumerate(ids) if t == IMAGE_TOKEN_INDEX), default=-1)
    return last + 1 if 0 <= last < len(ids) - 1 else 0


@dataclass
class PrefixStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    entries: int = 0
    bytes: int = 0
    max_bytes: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class PrefixCache:
    """key -> PmodCache (one row), at most `max_bytes` of cache tensors (each stored at its filled size), LRU. `get` returns a copy, so
    the stored prefix is never changed by the request that continues it."""

    def __init__(self, max_bytes: int):
        if int(max_bytes) < 0:
            raise ValueError(f"PrefixCache: max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[str, tuple[PmodCache, int]] = OrderedDict()
        self._bytes = 0
        self.hits = self.misses = self.evictions = 0

    def get(self, key: str, spare: int | None = None) -> PmodCache | None:
        """A copy of the cache stored under `key` (counted as a hit; `spare` as in `PmodCache.copy`), or None (a miss)."""
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry[0].copy(spare)

    def put(self, key: str, cache: PmodCache) -> bool:
        """Store a copy of `cache` (one row) under `key`, evicting the least recently used; False if it alone is
        larger than the bound (then nothing is stored)."""
        if cache.batch_size != 1:
            raise ValueError(f"PrefixCache stores one row per prefix, got a cache of {cache.batch_size} rows")
        size = cache.nbytes()  # stored at its filled size (copy(spare=0))
        if size > self.max_bytes:
            return False
        if key in self._entries:
            self._bytes -= self._entries.pop(key)[1]
        while self._entries and self._bytes + size > self.max_bytes:
            _, (_, old) = self._entries.popitem(last=False)
            self._bytes -= old
            self.evictions += 1
        self._entries[key] = (cache.copy(spare=0), size)
        self._bytes += size
        return True

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def stats(self) -> PrefixStats:
        return PrefixStats(self.hits, self.misses, self.evictions, len(self._entries), self._bytes, self.max_bytes)


def continue_prefix(model, prefixes: PrefixCache, input_ids: torch.Tensor, images=None, image_sizes=None,
                    salt: str = "", max_new_tokens: int = 0) -> tuple[dict, bool]:
    """generate() arguments for ONE prompt ([1, T], no padding) that reuse its prefix: (kwargs, hit). The prefix (up to
    its last image) comes from `prefixes` (a hit) or is prefilled now and stored (a miss); the kwargs then hold
    only the suffix, with `past_key_values` a copy of the prefix's cache (room for the suffix and `max_new_tokens`).
    A prompt without an image: its kwargs as given."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"continue_prefix takes one prompt [1, T], got input_ids of shape {tuple(input_ids.shape)}")
    ids = input_ids[0].tolist()
    cut = split_prefix(ids)
    whole = {"input_ids": input_ids, "images": images, "image_sizes": image_sizes}
    if cut == 0 or images is None:
        return whole, False
    pixels = list(images) if not torch.is_tensor(images) else list(images.unbind(0))
    key = prefix_key([image_digest(p) for p in pixels], ids[:cut], salt + f"|{model.attn_backend}|{model.dtype}")
    cache = prefixes.get(key, spare=len(ids) - cut + max_new_tokens)
    hit = cache is not None
    if not hit:
        with torch.inference_mode():  # room for the suffix and the answer; stored at its filled size
            cache = model(input_ids=input_ids[:, :cut], images=images, image_sizes=image_sizes, use_cache=True,
                          cache_reserve=len(ids) - cut + max_new_tokens, logits_to_keep="none",
                          output_routing=False).past_key_values
        prefixes.put(key, cache)
    return {"input_ids": input_ids[:, cut:], "past_key_values": cache}, hit
