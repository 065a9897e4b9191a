"""Admitting waiting requests to the running batch: their prefill, packed, and the server's prefix cache.

Without a prefix cache every admitted request is prefilled in one packed forward. With one (`PrefixCache`, keyed
by the images' pixel bytes and the token ids up to the prompt's last image), a request whose prefix is stored
skips it: the stored prefixes are copied into one batch (`stack_rows`) and the requests' suffixes (the text after
the image) run as one chunk over them (`forward(past_key_values=...)`), which equals prefilling the whole prompt
(PMOD_SPEC §5; tests/test_continuation.py). A request that misses is prefilled whole with the others, and its
prefix is cut out of that prefill's cache (`row_prefix`: the suffix is text, so every layer's prefix is its first
slots) and stored; requests of one admission with the same prefix as a miss continue that miss's prefix, so an
image asked about by several arrivals at once is prefilled once. Legend: b admitted rows, V vocab.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pmod.cache import PmodCache
from pmod.prefix_cache import PrefixCache, request_prefix, row_prefix, stack_rows
from pmod.serve.inputs import stack_inputs
from pmod.serve.usage import efficiency, prefill_efficiency, routing_map

__all__ = ["Admission", "admit"]

RESERVE = 64  # decode slots allocated with a prefill (more grow later)


@dataclass
class Admission:
    jobs: list  # the engine's Jobs, in row order
    logits: torch.Tensor  # [b, V] next-token logits of each row
    cache: PmodCache  # b rows


def admit(model, jobs: list, pad_id: int, prefixes: PrefixCache | None) -> list[Admission]:
    """Prefill `jobs` (one packed forward for those without a stored prefix, one chunk for those with one); sets
    each job's `efficiency`, `routing_out` and `cached_tokens`."""
    fresh, later, found = [], [], {}  # found: key -> (one-row prefix cache, meta), None while being prefilled
    for job in jobs:
        inp = job.inputs
        job.prefix = None if prefixes is None else request_prefix(model, inp["input_ids"], inp["images"],
                                                                 inp["image_sizes"])
        if job.prefix is None:
            fresh.append(job)
        elif job.prefix[0] in found:  # the prefix of a request admitted with this one: continued after its prefill
            prefixes.count_hit()
            later.append(job)
        elif (entry := prefixes.lookup(job.prefix[0])) is not None:
            found[job.prefix[0]] = entry
            later.append(job)
        else:  # a miss: prefilled whole, its prefix cut out (for `later` and the requests to come)
            found[job.prefix[0]] = None
            fresh.append(job)
    out = [_prefill(model, fresh, pad_id, prefixes, found)] if fresh else []
    if later:  # every prefix is in `found` now (a miss's even when too large to store)
        out.append(_continue(model, later, pad_id, found))
    return out


def _reserve(jobs: list) -> int:
    return min(max(j.max_tokens for j in jobs), RESERVE)


def _prefill(model, jobs: list, pad_id: int, prefixes: PrefixCache | None, found: dict) -> Admission:
    batch = stack_inputs([j.inputs for j in jobs], pad_id)
    storing = [j.prefix is not None for j in jobs]  # every fresh job with a prefix is a miss
    routing = any(j.routing for j in jobs) or any(storing)  # a stored prefix keeps its map for the hits to come
    out = model(**batch, use_cache=True, cache_reserve=_reserve(jobs), logits_to_keep="last", output_routing=routing)
    cache = out.past_key_values
    for b, job in enumerate(jobs):
        job.efficiency = prefill_efficiency(model.config, out.layout, b)
        job.cached_tokens = 0
        rmap = routing_map(model.config, out, b, _image_counts(model, job.inputs)) if routing else None
        job.routing_out = rmap if job.routing else None
        if storing[b]:  # cut out and stored
            key, cut = job.prefix
            entry = (row_prefix(cache, b, job.inputs["input_ids"].shape[1] - cut),
                     {"efficiency": job.efficiency, "routing": rmap})
            prefixes.put(key, *entry, take=True)
            found[key] = entry
    return Admission(jobs, out.logits, cache)


def _continue(model, jobs: list, pad_id: int, found: dict) -> Admission:
    suffix = []
    for job in jobs:
        ids = job.inputs["input_ids"][:, job.prefix[1]:]  # [1, t] text after the last image
        suffix.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "images": None, "image_sizes": None})
    batch = stack_inputs(suffix, pad_id)
    t = batch["input_ids"].shape[1]
    cache = stack_rows([found[j.prefix[0]][0] for j in jobs], spare=t + _reserve(jobs))
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], past_key_values=cache,
                cache_reserve=_reserve(jobs), logits_to_keep="last", output_routing=False)
    for job, s in zip(jobs, suffix):
        meta = found[job.prefix[0]][1]
        eff = meta["efficiency"]
        job.efficiency = efficiency(model.config, eff["vision_tokens"], job.prompt_tokens, eff["kept_per_layer"])
        job.routing_out = meta["routing"] if job.routing else None
        job.cached_tokens = job.prompt_tokens - s["input_ids"].shape[1]
    return Admission(jobs, out.logits, cache)


def _image_counts(model, inputs: dict) -> list[int] | None:
    if inputs["images"] is None:
        return None
    return model.image_token_counts(inputs["images"], inputs["image_sizes"])
