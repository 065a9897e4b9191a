"""Conversation templates: prompts and trained/masked segments, checked against the official formats."""
from __future__ import annotations

import pytest

from pmod.multimodal.templates import IMAGE_PLACEHOLDER, TEMPLATES, get_template, render, segments

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


def _chat(*turns: str, system: str | None = None) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": system}] if system is not None else []
    return msgs + [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)]


def _official_two_style(system: str, turns: list[str | None]) -> str:
    """Re-derivation of official SeparatorStyle.TWO (sep " ", sep2 "</s>"): a None message is the open turn."""
    seps, roles = (" ", "</s>"), ("USER", "ASSISTANT")
    out = system + seps[0]
    for i, msg in enumerate(turns):
        out += f"{roles[i % 2]}: {msg}{seps[i % 2]}" if msg else f"{roles[i % 2]}:"
    return out


def _official_trained_text(conversation: str) -> str:
    """The text LLaVA's preprocess_v1 leaves unmasked, at character level: per round (split on "</s>"),
    everything after " ASSISTANT:" plus the round's closing "</s>"."""
    trained = ""
    for rnd in conversation.split("</s>")[:-1]:
        _, answer = rnd.split(" ASSISTANT: ")
        trained += " " + answer + "</s>"
    return trained


def test_placeholder():
    assert IMAGE_PLACEHOLDER == "<image>"


def test_vicuna_v1_prompt_is_the_spec_string():
    got = render("vicuna_v1", _chat("<image>\nWhat is shown?"))
    assert got == VICUNA_SYSTEM + " USER: <image>\nWhat is shown? ASSISTANT:"
    assert got == _official_two_style(VICUNA_SYSTEM, ["<image>\nWhat is shown?", None])
    assert TEMPLATES["vicuna_v1"].system == VICUNA_SYSTEM


@pytest.mark.parametrize("rounds", [1, 2, 3])
def test_vicuna_multi_round_matches_official_format(rounds):
    turns = []
    for r in range(rounds):
        turns += [("<image>\n" if r == 0 else "") + f"question {r}?", f"answer {r}."]
    full = "".join(text for text, _ in segments("vicuna_v1", _chat(*turns)))
    assert full == _official_two_style(VICUNA_SYSTEM, turns)
    open_prompt = render("vicuna_v1", _chat(*turns, "next?"))
    assert open_prompt == _official_two_style(VICUNA_SYSTEM, [*turns, "next?", None])


def test_vicuna_masking_follows_preprocess_v1():
    turns = ["<image>\nWhat colour?", "Red.", "And the shape?", "A square."]
    segs = segments("vicuna_v1", _chat(*turns))
    assert [trained for _, trained in segs] == [False, True, False, True]
    masked = [t for t, trained in segs if not trained]
    assert all(t.endswith("ASSISTANT:") for t in masked)  # masked up to and including "ASSISTANT:"
    assert [t for t, trained in segs if trained] == [" Red.</s>", " A square.</s>"]  # "</s>" is trained
    full = "".join(t for t, _ in segs)
    assert "".join(t for t, trained in segs if trained) == _official_trained_text(full)


def test_system_message_overrides_default():
    got = render("vicuna_v1", _chat("hi", system="Be brief."))
    assert got == "Be brief. USER: hi ASSISTANT:"


def test_plain_pretraining_is_image_then_caption():
    segs = segments("plain", _chat("<image>\nRender a clear and concise summary of the photo.", "A red square."))
    assert segs == [("<image>", False), ("A red square.\n", True)]  # official preprocess_plain drops the instruction
    assert render("plain", _chat("<image>")) == "<image>"


def test_llama3_format():
    segs = segments("llama3", _chat("<image>\nWhat?", "A cat."))
    prompt = (
        "<|start_header_id|>system<|end_header_id|>\n\nYou are a helpful language and vision assistant.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert segs[0] == (prompt, False)
    assert segs[1] == ("A cat.<|eot_id|>", True)
    assert render("llama3", _chat("hi")).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_chatml_and_qwen_alias():
    assert get_template("qwen") is get_template("chatml")
    got = render("qwen", _chat("<image>\nWhat?"))
    assert got == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<image>\nWhat?<|im_end|>\n<|im_start|>assistant\n"
    )
    segs = segments("chatml", _chat("q", "a"))
    assert segs[-1] == ("a<|im_end|>\n", True)


def test_segments_concatenate_to_the_conversation():
    for name in ("vicuna_v1", "llama3", "chatml", "plain"):
        msgs = _chat("<image>\nq1", "a1", "q2", "a2") if name != "plain" else _chat("<image>", "caption")
        segs = segments(name, msgs)
        assert segs[-1][1] is True and segs[-1][0].endswith(get_template(name).assistant_suffix)
        text = "".join(t for t, _ in segs)
        assert text.count("a1" if name != "plain" else "caption") == 1


def test_llava_v1_system_prompt_is_the_official_one():
    # official conv_templates['llava_v1'] is conv_llava_v1: 'curious human' / 'the human's questions'

    assert get_template("llava_v1").system == VICUNA_SYSTEM.replace("user", "human")


def test_errors():
    with pytest.raises(ValueError, match="unknown conversation template"):
        get_template("vicuna_v2")
    with pytest.raises(ValueError, match="unknown role"):
        segments("vicuna_v1", [{"role": "tool", "content": "x"}])
    with pytest.raises(ValueError, match="start with a user"):
        segments("vicuna_v1", [{"role": "assistant", "content": "x"}])
    with pytest.raises(ValueError, match="ends with an assistant"):
        render("vicuna_v1", _chat("q", "a"))
