"""Our processor on a LLaVA-OneVision checkpoint against transformers' LlavaOnevisionProcessor (PIL backend)."""
from __future__ import annotations

import pytest
import torch
import vlm_common
from test_onevision import IMG, PINS_HW, S, tiny_onevision_hf
from vlm_common import picture, word_tokenizer

import pmod

WORDS = "what is in this image ? describe the two pictures . user assistant system you are a helpful".split()


def chat_tokenizer():
    """Word-level, Qwen-like: no BOS, chat markers and <image> as special tokens (<image> is id IMG)."""
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "\n", *WORDS])}
    vocab["<image>"] = IMG
    return word_tokenizer(vocab, ["<|im_start|>", "<image>"])


@pytest.fixture(scope="module")
def processors(tmp_path_factory):
    from transformers import LlavaOnevisionProcessor
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

    folder = tmp_path_factory.mktemp("ovp")
    tiny_onevision_hf(folder)
    tok = chat_tokenizer()
    ip = LlavaOnevisionImageProcessorPil(size={"height": S, "width": S}, image_grid_pinpoints=PINS_HW,
                                         image_mean=[0.5] * 3, image_std=[0.5] * 3)
    from transformers import LlavaOnevisionVideoProcessor

    theirs = LlavaOnevisionProcessor(image_processor=ip, tokenizer=tok, video_processor=LlavaOnevisionVideoProcessor(),
                                     num_image_tokens=9, vision_feature_select_strategy="full")
    ours = pmod.PmodProcessor(tok, pmod.load_config(folder))
    return ours, theirs, pmod.from_pretrained(folder, dtype=torch.float32)


def collapse(ids: list[int], counts: list[int]) -> list[int]:
    return vlm_common.collapse(ids, counts, IMG)


@pytest.mark.parametrize("size_wh", [(97, 45), (37, 101), (130, 129), (300, 41)])
def test_single_image_matches_transformers(processors, size_wh):
    ours, theirs, model = processors
    img = picture(*size_wh, seed=size_wh[0])
    prompt = "<|im_start|>user\n<image>\nwhat is in this image ?<|im_end|>\n<|im_start|>assistant\n"
    ref = theirs(text=prompt, images=[img], return_tensors="pt")
    got = ours(prompt, [img], chat=False)
    n_img = int((ref["input_ids"] == IMG).sum())
    assert model.image_token_counts(got["images"], got["image_sizes"]) == [n_img]
    assert got["input_ids"][0].tolist() == collapse(ref["input_ids"][0].tolist(), [n_img])
    assert got["image_sizes"] == [size_wh] and ref["image_sizes"][0].tolist() == [size_wh[1], size_wh[0]]
    assert torch.equal(got["images"][0], ref["pixel_values"][0])  # bit for bit


def test_two_images_in_one_sample_are_untiled(processors):
    ours, theirs, model = processors
    imgs = [picture(97, 45, 1), picture(40, 88, 2)]
    prompt = "<|im_start|>user\n<image><image>\ndescribe the two pictures .<|im_end|>\n<|im_start|>assistant\n"
    ref = theirs(text=prompt, images=[imgs], return_tensors="pt")
    got = ours(prompt, imgs, chat=False)
    assert got["input_ids"][0].tolist() == collapse(ref["input_ids"][0].tolist(), [10, 10])
    assert [x.shape[0] for x in got["images"]] == [1, 1]
    assert model.image_token_counts(got["images"], got["image_sizes"]) == [10, 10] and int((ref["input_ids"] == IMG).sum()) == 20
    for i in range(2):
        assert torch.equal(got["images"][i][0], ref["pixel_values"][i][0])


def test_chat_uses_the_qwen_template(processors):
    ours, _, _ = processors
    assert ours.apply_template("what is in this image ?") == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nwhat is in this image ?<|im_end|>\n"
        "<|im_start|>assistant\n")
