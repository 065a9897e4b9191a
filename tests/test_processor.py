"""The processor (text, chat, images -> model inputs) and the generate/chat command line."""
from __future__ import annotations

import io
import sys

import pytest
from conftest import tiny_model, tiny_tokenizer
from PIL import Image

import pmod
from pmod.multimodal.processor import PmodProcessor
from pmod.multimodal.templates import render, segments


@pytest.fixture
def checkpoint(tmp_path):
    model = tiny_model(layers=4, vocab_size=48)
    model.save_pretrained(tmp_path)
    PmodProcessor(tiny_tokenizer(), model.config).save_pretrained(tmp_path)
    Image.new("RGB", (50, 30), (200, 10, 10)).save(tmp_path / "red.png")
    return tmp_path


def test_vicuna_prompt_is_the_official_one():
    p = render("vicuna_v1", [{"role": "user", "content": "<image>\nWhat is it?"}])
    assert p == ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
                 "detailed, and polite answers to the user's questions. USER: <image>\nWhat is it? ASSISTANT:")
    segs = segments("vicuna_v1", [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
                                  {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}])
    assert [t for _, t in segs] == [False, True, False, True]
    assert segs[1][0] == " A1</s>" and segs[2][0] == "USER: Q2 ASSISTANT:"


def test_image_placeholders_become_minus_200_with_one_bos(checkpoint):
    proc = pmod.load_processor(checkpoint)
    ids = proc.encode("what <image> is this <image> ?")
    assert ids.count(pmod.IMAGE_TOKEN_INDEX) == 2 and ids.count(proc.tokenizer.bos_token_id) == 1 and ids[0] == 1


def test_batch_is_left_padded_and_images_follow_prompts(checkpoint):
    proc = pmod.load_processor(checkpoint)
    red = checkpoint / "red.png"
    out = proc(["what color is this?", "how many?"], images=[[red], []])
    ids, mask = out["input_ids"], out["attention_mask"]
    assert (mask[1, 0] == 0) and mask[:, -1].all()  # left padding
    assert (ids[0] == pmod.IMAGE_TOKEN_INDEX).sum() == 1 and (ids[1] == pmod.IMAGE_TOKEN_INDEX).sum() == 0
    assert out["images"].shape == (1, 3, 42, 42) and out["image_sizes"] == [(50, 30)]
    # pad: the 50x30 image is centred on the CLIP mean colour -> top rows are the mean, i.e. ~0 after normalising
    assert out["images"][0, :, 0].abs().max() < 0.02


def test_placeholder_count_must_match_images(checkpoint):
    proc = pmod.load_processor(checkpoint)
    with pytest.raises(ValueError, match="1 <image> placeholder.*2 image"):
        proc("<image> what color?", images=[checkpoint / "red.png", checkpoint / "red.png"])
    with pytest.raises(ValueError, match="one per prompt"):
        proc(["a", "b"], images=[checkpoint / "red.png"])


def test_bad_image_file_is_named(checkpoint):
    proc = pmod.load_processor(checkpoint)
    (checkpoint / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(ValueError, match="broken.png"):
        proc("what?", images=[checkpoint / "broken.png"])


def test_processor_and_model_generate_end_to_end(checkpoint):
    model, proc = pmod.from_pretrained(checkpoint), pmod.load_processor(checkpoint)
    inputs = proc(["what color is this?", "is this red?"], images=[[checkpoint / "red.png"], [checkpoint / "red.png"]])
    tokens = model.generate(**inputs, max_new_tokens=5, eos_token_id=[])
    texts = proc.batch_decode(tokens)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    first = proc.tokenizer.decode(tokens[:, :2].flatten().tolist())  # text both rows contain by step 2
    stops = model.generate(**inputs, max_new_tokens=5, eos_token_id=[], tokenizer=proc.tokenizer,
                           stop_strings=[proc.tokenizer.decode([int(tokens[0, 0])])])
    assert stops.shape[1] <= 5 and first


def test_cli_generate_prints_answer_and_efficiency(checkpoint, capsys):
    from pmod.cli import main

    rc = main(["generate", "--model", str(checkpoint), "--image", str(checkpoint / "red.png"), "--prompt", "what color?",
               "--max-new-tokens", "4", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert rc == 0 and out.endswith("\n")  # the (random) answer, streamed
    assert "vision tokens 9" in err and "KV" in err and "GFLOPs" in err and "complete convention" in err


def test_cli_chat_session(checkpoint, capsys, monkeypatch):
    from pmod.cli import main

    monkeypatch.setattr(sys, "stdin", io.StringIO(f"/image {checkpoint / 'red.png'}\nwhat color?\nand now?\n/quit\n"))
    rc = main(["chat", "--model", str(checkpoint), "--max-new-tokens", "3", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert rc == 0 and out.count("ASSISTANT: ") == 2, out  # two answered turns
    assert err.count("vision tokens 9") == 1, err  # the second turn continues the first turn's cache (issue 23)
    assert err.count("[continued a cache of") == 1, err


def test_cli_reports_bad_image_cleanly(checkpoint, capsys):
    from pmod.cli import main

    rc = main(["generate", "--model", str(checkpoint), "--image", str(checkpoint / "nope.png"), "--prompt", "hi", "--device", "cpu"])
    assert rc == 2 and "nope.png" in capsys.readouterr().err
