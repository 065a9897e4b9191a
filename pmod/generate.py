"""Batched generation over the reduced KV cache: one packed prefill, then one token per row per step.

Left or right padding of the prompt does not matter: the prefill drops padding and each row keeps
its own positions and cache lengths, so a batch's outputs equal its members' run one by one.
"""
from __future__ import annotations

from typing import Sequence

import torch

from pmod.sampling import sample_next
from pmod.validation import NonFiniteError, check_batch, check_generation, check_sampling, merged_lengths, nonfinite_rows

__all__ = ["generate"]


def generate(
    model,
    input_ids: torch.Tensor,
    images=None,
    image_sizes=None,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    stop_strings: Sequence[str] | None = None,
    tokenizer=None,
    streamer=None,
    generator: torch.Generator | None = None,
    return_cache: bool = False,
    cuda_graph: bool = False,
    past_key_values=None,
):
    """Returns new tokens [B, n_new] (pad_token_id after a row finishes); with `return_cache`, also the cache.

    A row finishes at an EOS token (default: the config's) or when its text ends with one of
    `stop_strings` (needs `tokenizer`). `streamer` follows transformers' protocol when it has `put` / `end`
    (`transformers.TextStreamer(tokenizer, skip_prompt=True)` prints the answer as it comes): `put(prompt ids)`
    first, then `put(tokens [B])` after each step, `end()` once at the end; the prompt holds no image placeholder
    (batch 1: those positions and the padding left out; batch > 1: [B, T] with them as `pad_token_id`). Any other
    callable is called as `streamer(tokens [B])` after each step.
    `past_key_values` (a PmodCache): `input_ids` (and `images`) continue that cache, in place, in one chunk
    (`pmod.modeling.chunk`); pass `cache.copy()` to keep the prefix. The returned cache holds every generated
    token but the last one (never fed back): a further turn starts with it.
    `cuda_graph=True` (CUDA, SDPA or eager attention) replays each decode step from one captured graph
    (`pmod.cudagraph`): the same tokens, without the per-kernel launch cost of the host. Graphs are captured once
    per (rows, capacity bucket, dtype, device) and kept by the model's pool (`decode_graphs(model)`, LRU of 4),
    so later calls of a similar shape only copy their prefill into the graph's tensors.
    """
    cfg = model.config.text
    # every argument checked before the prefill allocates its cache (max_new_tokens=10**9 is refused here)
    stop_strings = check_generation(max_new_tokens, stop_strings, tokenizer, eos_token_id, pad_token_id)
    check_sampling(do_sample, temperature, top_k, top_p)
    ids_host, mask_host = check_batch(input_ids, attention_mask, cfg.vocab_size)
    lens = merged_lengths(ids_host, mask_host, model.image_token_counts(images, image_sizes) if images is not None else [])
    if past_key_values is not None and past_key_values.positions is not None and len(lens) == past_key_values.batch_size:
        lens = [n + p for n, p in zip(lens, past_key_values.positions.tolist())]  # the chunk after each row's prefix
    longest = max(lens)
    context = max(cfg.max_position_embeddings, model.config.model_max_length)
    if longest + max_new_tokens > context:
        raise ValueError(f"prompt ({longest} tokens with images) + max_new_tokens ({max_new_tokens}) exceeds the "
                         f"model's context of {context} tokens")
    eos = cfg.eos_token_ids if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    pad = pad_token_id if pad_token_id is not None else (cfg.pad_token_id if cfg.pad_token_id is not None else (eos[0] if eos else 0))
    choose = lambda logits: sample_next(logits, do_sample, temperature, top_k, top_p, generator)  # noqa: E731

    with torch.inference_mode():
        out = model(input_ids=input_ids, images=images, image_sizes=image_sizes, attention_mask=attention_mask,
                    use_cache=True, cache_reserve=max_new_tokens, logits_to_keep="last", output_routing=False,
                    past_key_values=past_key_values)
        cache, logits = out.past_key_values, out.logits
        B = logits.shape[0]
        eos_t = torch.tensor(eos, dtype=torch.long, device=logits.device)
        finished = torch.zeros(B, dtype=torch.bool, device=logits.device)
        steps: list[torch.Tensor] = []
        stream = _streamer(streamer, input_ids, attention_mask, pad)
        graph = None
        if cuda_graph and max_new_tokens > 1:
            from pmod.cudagraph import check_graphable, decode_graphs

            pool = decode_graphs(model)
            check_graphable(model, pool.capture)
            graph = pool.acquire(cache, max_new_tokens - 1)  # captured once per key, then reused
        bad = torch.zeros((), dtype=torch.bool, device=logits.device)  # NaN/Inf seen, read at the step's one host sync
        for step in range(max_new_tokens):
            bad = bad | ~torch.isfinite(logits).all()
            chosen = choose(logits)  # [B]
            nxt = torch.where(finished, pad, chosen)  # finished rows show padding ...
            steps.append(nxt)
            if stream is not None:
                stream(nxt)
            finished = finished | torch.isin(nxt, eos_t)
            if stop_strings:
                finished = finished | _hit_stop(torch.stack(steps, 1), tokenizer, stop_strings).to(finished.device)
            if step + 1 == max_new_tokens:
                break
            done, nonfinite = torch.stack([finished.all(), bad]).tolist()  # one host sync per step, to stop early
            if done or nonfinite:
                break
            # ... but feed a real token (pad may be no vocab id)
            logits = graph.step(chosen) if graph is not None else model.decode_step(chosen, cache)
        if graph is not None:  # a cache the caller keeps gets its own tensors: the pool's are replayed by later calls
            graph.close(keep=return_cache or past_key_values is not None)
        if bool(bad):
            _raise_nonfinite(logits, len(steps) - 1)
        if hasattr(streamer, "end"):
            streamer.end()
    tokens = torch.stack(steps, dim=1)
    return (tokens, cache) if return_cache else tokens


def _raise_nonfinite(logits: torch.Tensor, step: int) -> None:
    """The official code raises on NaN/Inf in a MoD layer; a NaN row would otherwise answer with token 0."""
    rows = nonfinite_rows(logits)
    raise NonFiniteError(f"non-finite logits (NaN/Inf) at generation step {step} in row(s) {rows or '?'}: the model's "
                             f"weights, pixel values or cache hold NaN/Inf (from_pretrained checks weights as it reads them)")


def _streamer(streamer, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, pad: int):
    """The per-step call of `streamer`: transformers' `put` (after it has been given the prompt) or the callable."""
    if streamer is None:
        return None
    if not hasattr(streamer, "put"):
        return streamer
    from pmod.packing import IMAGE_TOKEN_INDEX

    ids = input_ids.cpu()
    if ids.shape[0] == 1:  # [1, T']: the text of the prompt
        keep = ids[0] != IMAGE_TOKEN_INDEX
        if attention_mask is not None:
            keep &= attention_mask[0].cpu().bool()
        ids = ids[:, keep]
    else:
        ids = torch.where(ids == IMAGE_TOKEN_INDEX, pad, ids)
    streamer.put(ids)
    return lambda tokens: streamer.put(tokens.cpu())


def _hit_stop(tokens: torch.Tensor, tokenizer, stop_strings: Sequence[str]) -> torch.Tensor:
    tail = tokens[:, -16:].tolist()
    texts = [tokenizer.decode(row) for row in tail]
    return torch.tensor([any(t.endswith(s) or s in t for s in stop_strings) for t in texts])
