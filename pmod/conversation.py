"""A multi-turn conversation that keeps its reduced cache: each turn prefills only the new text.

The cache after a turn holds the prompt and the answer as decoded, all but the last generated token
(`generate` never feeds it back). The next turn's chunk is that token, then the template's text
between the answer and the next generation prompt (the answer's closing suffix, less what the last
token already says when it is the EOS, and the new user turn with the assistant prefix). The
conversation's token history (`tokens`) is therefore exactly what the cache holds plus the pending
token: recomputing it from scratch gives the same answers (tests/test_conversation.py).
"""
from __future__ import annotations

import torch

from pmod.multimodal.templates import segments

__all__ = ["Conversation"]


class Conversation:
    """State of one conversation: the cache, the token ids in it (IMAGE_TOKEN_INDEX for an image), the last
    generated token not yet in it. `inputs(messages, images)` gives the next turn's generate() arguments."""

    def __init__(self, model, processor):
        self.model, self.processor = model, processor
        self.reset()

    def reset(self) -> None:
        self.cache = None
        self.tokens: list[int] = []  # fed to the cache so far
        self.pending: int | None = None  # the last generated token, first of the next chunk
        self.turns = 0  # answered turns in the cache

    @property
    def cached(self) -> int:
        """Positions the cache holds (text + image tokens of the whole conversation so far)."""
        return 0 if self.cache is None else int(self.cache.positions[0])

    def inputs(self, messages: list[dict[str, str]], images) -> dict:
        """generate() keyword arguments for the turn whose last message is the new user message: the whole
        prompt on the first turn (or after reset), else only the new chunk with `past_key_values`."""
        answered = sum(m["role"] == "assistant" for m in messages)
        if self.cache is None or answered != self.turns:  # a history this cache does not hold: start over
            self.reset()
            inputs = self.processor(messages, images=images or None)
            self._next = inputs["input_ids"][0].tolist()
            return inputs
        t = self.processor.template
        new_turn = segments(t, messages)[-1][0]  # "USER: ... ASSISTANT:"
        suffix = t.assistant_suffix
        last = self.processor.tokenizer.decode([self.pending], skip_special_tokens=False)
        if last and suffix.startswith(last):  # the EOS closed the answer: it is the suffix's first piece
            suffix = suffix[len(last):]
        ids = self._encode(suffix + new_turn)
        self._next = [self.pending] + ids
        chunk = torch.tensor([self._next], dtype=torch.long)
        return {"input_ids": chunk, "attention_mask": torch.ones_like(chunk), "images": None, "image_sizes": None,
                "past_key_values": self.cache}

    def record(self, tokens: torch.Tensor, cache) -> None:
        """After generate(..., return_cache=True) of this turn: tokens [1, n] answered, `cache` as returned."""
        out = tokens[0].tolist()
        self.tokens += self._next + out[:-1]
        self.pending, self.cache = out[-1], cache
        self.turns += 1

    def history(self) -> list[int]:
        """Every token of the conversation so far, the pending one included (what a recompute would feed)."""
        return self.tokens + ([] if self.pending is None else [self.pending])

    def _encode(self, text: str) -> list[int]:
        ids = self.processor.encode(text)
        bos = self.processor.tokenizer.bos_token_id
        return ids[1:] if bos is not None and ids[:1] == [bos] else ids  # mid-conversation: no BOS
