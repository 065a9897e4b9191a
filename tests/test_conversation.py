"""pmod.conversation: a chat that keeps its reduced cache answers as a recompute of its whole token history."""
from __future__ import annotations

import torch
from conftest import tiny_model, tiny_tokenizer
from PIL import Image

from pmod.conversation import Conversation
from pmod.multimodal.processor import PmodProcessor
from pmod.packing import IMAGE_TOKEN_INDEX
from pmod.schedule import kept_count


def _setup(template: str = "vicuna_v1"):
    model = tiny_model(layers=4, vocab_size=48)
    processor = PmodProcessor(tiny_tokenizer(), model.config, template=template)
    return model, processor, Image.new("RGB", (50, 30), (200, 10, 10))


def _turns(model, processor, image, questions, max_new_tokens=4):
    """Run the questions as one conversation; returns (conversation, [(inputs, whole token sequence, answer)] per turn)."""
    conv, messages, log = Conversation(model, processor), [], []
    for q in questions:
        messages.append({"role": "user", "content": q})
        inputs = conv.inputs(messages, [image])
        tokens, cache = model.generate(**inputs, max_new_tokens=max_new_tokens, return_cache=True, eos_token_id=[])
        log.append((inputs, conv.tokens + inputs["input_ids"][0].tolist(), tokens))  # the chunk starts with the pending token
        conv.record(tokens, cache)
        messages.append({"role": "assistant", "content": processor.decode(tokens[0])})
    return conv, log


def test_turns_after_the_first_prefill_only_new_text_and_equal_a_recompute():
    model, processor, image = _setup()
    conv, log = _turns(model, processor, image, ["what color is this image?", "how many?", "is it red?"])
    pixels = processor([{"role": "user", "content": "x"}], images=[image])["images"]
    for turn, (inputs, history, tokens) in enumerate(log):
        assert ("past_key_values" in inputs) == (turn > 0)
        if turn:  # the chunk: the last answer's last token, then the new turn's text, no image
            assert IMAGE_TOKEN_INDEX not in inputs["input_ids"][0].tolist() and inputs["images"] is None
            assert inputs["input_ids"].shape[1] < 12
        want = model.generate(input_ids=torch.tensor([history]), images=pixels, max_new_tokens=4, eos_token_id=[])
        assert torch.equal(tokens, want), turn
    # the cache stays reduced: every text token, only the kept vision tokens of each MoD layer
    n_text = len(conv.tokens) - 1
    ratios = model.language_model.ratios
    assert conv.cache.layer_lengths() == [n_text + (kept_count(9, ratios[i]) if i in ratios else 9) for i in range(4)]


def test_a_history_the_cache_does_not_hold_starts_over():
    """A conversation whose messages do not continue the cached turns (edited, or reset) prefills them all."""
    model, processor, image = _setup()
    conv, _ = _turns(model, processor, image, ["what color?"])
    inputs = conv.inputs([{"role": "user", "content": "how many?"}], [image])  # no answered turn: a new conversation
    assert "past_key_values" not in inputs and conv.cache is None and IMAGE_TOKEN_INDEX in inputs["input_ids"][0].tolist()


def test_the_answers_closing_suffix_is_fed_once():
    """vicuna closes an answer with "</s>": after an answer that ended at EOS the chunk is [EOS] + the next turn;
    after one cut by max_new_tokens it is [last token] + "</s>" + the next turn."""
    model, processor, image = _setup()
    eos = processor.tokenizer.eos_token_id
    msgs = [{"role": "user", "content": "what?"}, {"role": "assistant", "content": "red"}, {"role": "user", "content": "why?"}]
    turn = processor.encode("USER: why? ASSISTANT:")[1:]
    for last, want in [(eos, [eos] + turn), (7, [7, eos] + turn)]:
        conv = Conversation(model, processor)
        conv.inputs(msgs[:1], [])
        conv.record(torch.tensor([[5, last]]), object())
        conv.cache = type("Cache", (), {"positions": torch.tensor([9])})()  # only positions are read to build a chunk
        assert conv.inputs(msgs, [])["input_ids"][0].tolist() == want, last
