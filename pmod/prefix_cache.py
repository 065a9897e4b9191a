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

__all__ = ["PrefixCache", "PrefixStats", "image_digest", "prefix_key", "split_prefix", "request_prefix", "row_prefix",
           "stack_rows", "continue_prefix"]


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


def request_prefix(model, input_ids: torch.Tensor, images, image_sizes=None, salt: str = "") -> tuple[str, int] | None:
    """(key, cut) of ONE prompt [1, T] (no padding): its prefix ends at input_ids[:, :cut] (after the last image);
    None when it has nothing to reuse (no image, or nothing after the last one)."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"request_prefix takes one prompt [1, T], got input_ids of shape {tuple(input_ids.shape)}")
    ids = input_ids[0].tolist()
    cut = split_prefix(ids)
    if cut == 0 or images is None:
        return None
    pixels = list(images) if not torch.is_tensor(images) else list(images.unbind(0))
    sizes = "" if image_sizes is None else str([tuple(int(v) for v in s) for s in image_sizes])  # anyres unpads by size
    salt = f"{salt}|{model.attn_backend}|{model.dtype}|{sizes}"
    return prefix_key([image_digest(p) for p in pixels], ids[:cut], salt), cut


def row_prefix(cache: PmodCache, row: int, drop: int) -> PmodCache:
    """A new one-row cache: row `row` of `cache` without its last `drop` tokens in every layer, at its filled size.

    After a prefill of [prefix, suffix] where the suffix is text (it follows the prompt's last image), every layer
    processed each suffix token, so each layer's prefix is its first `length - drop` slots, and the row's next
    position moves back by `drop` (text advances it by one a token, M-RoPE too). Causality makes these slots equal
    to a prefill of the prefix alone (PMOD_SPEC §5)."""
    out = PmodCache(cache.num_layers, 1, heads_first=cache.heads_first)
    lens: dict[tuple[int, torch.device], torch.Tensor] = {}  # layers of one length share one lengths tensor
    for i in range(cache.num_layers):
        if cache.k[i] is None:
            continue
        n = cache.lengths[i][row] - drop
        if n < 0:
            raise ValueError(f"row_prefix: layer {i} holds {cache.lengths[i][row]} tokens of row {row}, fewer than "
                             f"the {drop} to drop")
        for src, dst in ((cache.k, out.k), (cache.v, out.v)):
            dst[i] = src[i][row : row + 1].narrow(cache.slot_dim, 0, n).clone(memory_format=torch.contiguous_format)
        dev = cache.seqlens[i].device
        if (n, dev) not in lens:
            lens[n, dev] = torch.tensor([n], dtype=torch.long, device=dev)
        out.lengths[i], out.seqlens[i] = [n], lens[n, dev]
    out.positions = cache.positions[row : row + 1] - drop
    return out


def stack_rows(caches: list[PmodCache], spare: int = 0) -> PmodCache:
    """One cache whose row r is a copy of `caches[r]` (each one row), every layer sized to its longest row + `spare`
    (the chunk and the answer to come); slots past a row's length are zero and never read."""
    if not caches or any(c.batch_size != 1 for c in caches):
        raise ValueError(f"stack_rows takes one-row caches, got batch sizes {[c.batch_size for c in caches]}")
    first = caches[0]
    if any(c.num_layers != first.num_layers or c.heads_first != first.heads_first for c in caches):
        raise ValueError("stack_rows: the caches differ in layers or layout")
    out = PmodCache(first.num_layers, len(caches), heads_first=first.heads_first)
    shared: dict[tuple[tuple[int, ...], torch.device], torch.Tensor] = {}
    for i in range(first.num_layers):
        if first.k[i] is None:
            continue
        lens = [c.lengths[i][0] for c in caches]
        for store, dst in (("k", out.k), ("v", out.v)):
            t = getattr(first, store)[i]
            _, S, G, D = first.slots(t).shape
            dst[i] = t.new_zeros((len(caches), G, max(lens) + spare, D) if first.heads_first else
                                 (len(caches), max(lens) + spare, G, D))
            for r, (c, n) in enumerate(zip(caches, lens)):
                out.slots(dst[i])[r, :n] = c.slots(getattr(c, store)[i])[0, :n]
        dev = first.seqlens[i].device
        if (tuple(lens), dev) not in shared:
            shared[tuple(lens), dev] = torch.tensor(lens, dtype=torch.long, device=dev)
        out.lengths[i], out.seqlens[i] = lens, shared[tuple(lens), dev]
    out.positions = torch.cat([c.positions for c in caches])
    return out


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
        self._entries: OrderedDict[str, tuple[PmodCache, int, object]] = OrderedDict()  # key -> (cache, bytes, meta)
        self._bytes = 0
        self.hits = self.misses = self.evictions = 0

    def get(self, key: str, spare: int | None = None) -> PmodCache | None:
        """A copy of the cache stored under `key` (counted as a hit; `spare` as in `PmodCache.copy`), or None (a miss)."""
        found = self.lookup(key)
        return None if found is None else found[0].copy(spare)

    def lookup(self, key: str) -> tuple[PmodCache, object] | None:
        """(the stored cache itself, its meta) counted as a hit, or None (a miss). The cache is shared: read it
        (`copy`, `stack_rows`), never continue it in place."""
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry[0], entry[2]

    def count_hit(self) -> None:
        """A request served from a prefix its own batch just prefilled (not looked up here, but a hit all the same)."""
        self.hits += 1

    def put(self, key: str, cache: PmodCache, meta: object = None, take: bool = False) -> bool:
        """Store a copy of `cache` (one row; `take=True`: the cache itself, the caller's to give) and `meta` under
        `key`, evicting the least recently used; False if it alone is larger than the bound (nothing is stored)."""
        if cache.batch_size != 1:
            raise ValueError(f"PrefixCache stores one row per prefix, got a cache of {cache.batch_size} rows")
        size = cache.nbytes()  # stored at its filled size (copy(spare=0))
        if size > self.max_bytes:
            return False
        if key in self._entries:
            self._bytes -= self._entries.pop(key)[1]
        while self._entries and self._bytes + size > self.max_bytes:
            _, (_, old, _) = self._entries.popitem(last=False)
            self._bytes -= old
            self.evictions += 1
        self._entries[key] = (cache if take else cache.copy(spare=0), size, meta)
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
    found = request_prefix(model, input_ids, images, image_sizes, salt)
    if found is None:
        return {"input_ids": input_ids, "images": images, "image_sizes": image_sizes}, False
    (key, cut), T = found, input_ids.shape[1]
    cache = prefixes.get(key, spare=T - cut + max_new_tokens)
    hit = cache is not None
    if not hit:
        with torch.inference_mode():  # room for the suffix and the answer; stored at its filled size
            cache = model(input_ids=input_ids[:, :cut], images=images, image_sizes=image_sizes, use_cache=True,
                          cache_reserve=T - cut + max_new_tokens, logits_to_keep="none",
                          output_routing=False).past_key_values
        prefixes.put(key, cache)
    return {"input_ids": input_ids[:, cut:], "past_key_values": cache}, hit
