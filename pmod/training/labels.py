"""Conversation -> (input_ids, labels) with LLaVA-style masking: only the assistant's answers are trained.

Why character offsets: LLaVA tokenises each round on its own and subtracts hand-tuned token counts
("- 2", "- 1 for the legacy tokenizer"), which breaks silently whenever a tokenizer merges across a
round boundary (its "tokenization mismatch" warning, after which the whole sample is masked). We
tokenise the full text once, exactly as the processor does at inference (each chunk between `<image>`
placeholders on its own, BOS only at the very start, -200 in between) and mark a token trained when
its first character lies in a trained segment of `pmod.multimodal.templates.segments`. Slow
tokenizers without offsets fall back to tokenising segment by segment.
"""
from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass

from pmod.multimodal.templates import IMAGE_PLACEHOLDER
from pmod.packing import IGNORE_INDEX, IMAGE_TOKEN_INDEX

__all__ = ["Tokenized", "tokenize_segments", "truncate", "count_targets"]


@dataclass
class Tokenized:
    input_ids: list[int]  # with IMAGE_TOKEN_INDEX for each image
    labels: list[int]  # IGNORE_INDEX where not trained


class _Spans:
    """Which characters of the full text are trained: sorted segment starts and their flags."""

    def __init__(self, segments: list[tuple[str, bool]]):
        self.starts, self.flags, pos = [], [], 0
        for text, trained in segments:
            self.starts.append(pos)
            self.flags.append(trained)
            pos += len(text)

    def trained(self, char: int) -> bool:
        return self.flags[max(bisect_right(self.starts, char) - 1, 0)]


def _with_offsets(tokenizer, segments: list[tuple[str, bool]]) -> Tokenized:
    full = "".join(t for t, _ in segments)
    spans = _Spans(segments)
    ids: list[int] = []
    labels: list[int] = []
    base = 0
    for i, chunk in enumerate(full.split(IMAGE_PLACEHOLDER)):
        if i > 0:
            ids.append(IMAGE_TOKEN_INDEX)
            labels.append(IGNORE_INDEX)
            base += len(IMAGE_PLACEHOLDER)
        enc = tokenizer(chunk, return_offsets_mapping=True, return_special_tokens_mask=True)
        for j, (tok, (start, end), special) in enumerate(zip(enc["input_ids"], enc["offset_mapping"], enc["special_tokens_mask"])):
            if special and start == end:  # added by the tokenizer's template (BOS): never trained
                if i > 0 and j == 0 and tok == tokenizer.bos_token_id:
                    continue  # BOS only at the very start, as the processor encodes prompts
                ids.append(tok)
                labels.append(IGNORE_INDEX)
                continue
            ids.append(tok)
            labels.append(tok if spans.trained(base + start) else IGNORE_INDEX)
        base += len(chunk)
    return Tokenized(ids, labels)


def _by_segment(tokenizer, segments: list[tuple[str, bool]]) -> Tokenized:
    ids: list[int] = []
    labels: list[int] = []
    for k, (text, trained) in enumerate(segments):
        for i, chunk in enumerate(text.split(IMAGE_PLACEHOLDER)):
            if i > 0:
                ids.append(IMAGE_TOKEN_INDEX)
                labels.append(IGNORE_INDEX)
            toks = tokenizer(chunk, add_special_tokens=(k == 0 and i == 0))["input_ids"]
            ids.extend(toks)
            labels.extend(toks if trained else [IGNORE_INDEX] * len(toks))
    if ids and ids[0] == tokenizer.bos_token_id:
        labels[0] = IGNORE_INDEX
    return Tokenized(ids, labels)


def tokenize_segments(tokenizer, segments: list[tuple[str, bool]]) -> Tokenized:
    """Token ids and labels of a conversation given as (text, trained) segments."""
    if getattr(tokenizer, "is_fast", False):
        return _with_offsets(tokenizer, segments)
    return _by_segment(tokenizer, segments)


def truncate(tok: Tokenized, image_tokens: list[int], max_length: int) -> Tokenized | None:
    """Cut the tail so that the merged sequence (each -200 expanded to its image's feature tokens) has at
    most `max_length` tokens. Returns None when an image would be cut: the model needs whole images,
    and dropping an image the text refers to would train on a different question."""
    merged = 0
    img = 0
    for n, t in enumerate(tok.input_ids):
        width = image_tokens[img] if t == IMAGE_TOKEN_INDEX else 1
        if merged + width > max_length:
            if IMAGE_TOKEN_INDEX in tok.input_ids[n:]:
                return None
            return Tokenized(tok.input_ids[:n], tok.labels[:n])
        merged += width
        img += t == IMAGE_TOKEN_INDEX
    return tok


def count_targets(labels: list[int]) -> int:
    """Supervised next-token targets: trained labels that have a token before them."""
    return sum(1 for x in labels[1:] if x != IGNORE_INDEX)
