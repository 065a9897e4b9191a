"""Our processor on a Qwen2.5-VL checkpoint against transformers' Qwen2_5_VLProcessor (PIL image backend)."""
from __future__ import annotations

import pytest
import torch
import vlm_common
from test_qwen2_5_vl import DP, IMG, VEND, VSTART, tiny_qwen_hf
from vlm_common import picture, word_tokenizer

import pmod
from pmod.multimodal.qwen2_5_vl import qwen_num_tokens, smart_resize

MIN_PX, MAX_PX = 28 * 28 * 4, 28 * 28 * 30
WORDS = "what is in this image ? describe the two pictures . user assistant system you are a helpful".split()


def qwen_tokenizer():
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", *WORDS])}
    vocab.update({"<|image_pad|>": IMG, "<|vision_start|>": VSTART, "<|vision_end|>": VEND, "<|video_pad|>": 151})
    return word_tokenizer(vocab, ["<|im_start|>", "<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>"])


@pytest.fixture(scope="module")
def processors(tmp_path_factory):
    from transformers import Qwen2_5_VLProcessor, Qwen2VLVideoProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    folder = tmp_path_factory.mktemp("qwenp")
    tiny_qwen_hf(folder)
    ip = Qwen2VLImageProcessorPil(min_pixels=MIN_PX, max_pixels=MAX_PX)
    ip.save_pretrained(folder)  # preprocessor_config.json: our loader reads min / max pixels and the norms from it
    tok = qwen_tokenizer()
    theirs = Qwen2_5_VLProcessor(image_processor=ip, tokenizer=tok, video_processor=Qwen2VLVideoProcessor())
    cfg = pmod.load_config(folder)
    assert (cfg.vision.min_pixels, cfg.vision.max_pixels) == (MIN_PX, MAX_PX)
    return pmod.PmodProcessor(tok, cfg), theirs, pmod.from_pretrained(folder, dtype=torch.float32)


def collapse(ids: list[int], counts: list[int]) -> list[int]:
    return vlm_common.collapse(ids, counts, IMG)


@pytest.mark.parametrize("sizes", [[(97, 45)], [(300, 41)], [(500, 500)], [(20, 30)], [(61, 150), (333, 77)]])
def test_matches_transformers(processors, sizes):
    ours, theirs, model = processors
    imgs = [picture(w, h, seed=w) for w, h in sizes]
    n_img = len(imgs)
    q = "<|im_start|>user\n" + "<|vision_start|>{}<|vision_end|>" * n_img + "what is in this image ?<|im_end|>\n<|im_start|>assistant\n"
    ref = theirs(text=q.format(*["<|image_pad|>"] * n_img), images=imgs, return_tensors="pt")
    got = ours(q.format(*["<image>"] * n_img), imgs, chat=False)
    grids = ref["image_grid_thw"].tolist()
    counts = [t * h * w // 4 for t, h, w in grids]
    assert model.image_token_counts(got["images"], got["image_sizes"]) == counts
    assert counts == [qwen_num_tokens(s, 14, 2, MIN_PX, MAX_PX) for s in sizes]
    assert got["input_ids"][0].tolist() == collapse(ref["input_ids"][0].tolist(), counts)
    assert [[1, x.shape[1] * 2, x.shape[2] * 2] for x in got["images"]] == grids
    assert torch.equal(torch.cat([x.reshape(-1, DP) for x in got["images"]]), ref["pixel_values"])  # bit for bit


def test_chat_template_wraps_the_image(processors):
    ours, _, _ = processors
    out = ours("what is in this image ?", [picture(97, 45, 0)])
    text = ours.apply_template([{"role": "user", "content": "<|vision_start|><image><|vision_end|>what is in this image ?"}])
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>")
    assert out["input_ids"][0].tolist() == ours.encode(text)


def test_smart_resize_bounds():
    assert smart_resize(45, 97, 28, MIN_PX, MAX_PX) == (56, 84)  # round(45/28)=2, round(97/28)=3 (half to even)
    h, w = smart_resize(1000, 1000, 28, MIN_PX, MAX_PX)
    assert h * w <= MAX_PX and h % 28 == w % 28 == 0
    with pytest.raises(ValueError, match="over 200"):
        smart_resize(1, 300, 28, MIN_PX, MAX_PX)
