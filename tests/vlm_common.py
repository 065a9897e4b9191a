"""What the tests of the transformers VLM families (llava-hf, LLaVA-OneVision, Qwen2.5-VL, Qwen3-VL) share: random
weights for a tiny transformers model, p-MoD with random routers, test pictures, a word-level chat tokenizer, and
the parity checks against transformers (greedy tokens, a save round trip)."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

import pmod
from pmod.config import ModConfig


def randomize_and_save(hf, folder):
    """Weights ~ N(0, 0.1), vectors (norms, biases) jittered by N(0, 0.05), so that no path is an identity; saved."""
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.1) if p.dim() > 1 else p.add_(torch.randn_like(p) * 0.05)
    hf.save_pretrained(folder)
    return hf


def routed(folder, ratios: dict[int, float], seed: int = 0):
    """The checkpoint converted to p-MoD at `ratios`, with random routers, so that routing actually chooses."""
    model = pmod.from_pretrained(folder, dtype=torch.float32, mod=ModConfig(layer_ratios=ratios))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for r in model.language_model.routers.values():
            r.weight.copy_(torch.randn(r.weight.shape, generator=g) * 0.5)
            r.bias.copy_(torch.randn(r.bias.shape, generator=g) * 0.1)
    return model


def picture(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def word_tokenizer(vocab: dict[str, int], specials: list[str]):
    """Word-level, Qwen-like chat tokenizer: no BOS, <|im_end|> as EOS, `specials` never split."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<|im_end|>")
    fast.add_special_tokens({"additional_special_tokens": specials})
    return fast


def collapse(ids: list[int], counts: list[int], image_id: int) -> list[int]:
    """transformers' runs of image ids (counts[i] for image i) -> our one IMAGE_TOKEN_INDEX per image."""
    out, i, it = [], 0, iter(counts)
    while i < len(ids):
        if ids[i] == image_id:
            n = next(it)
            assert ids[i : i + n] == [image_id] * n
            out.append(pmod.IMAGE_TOKEN_INDEX)
            i += n
        else:
            out.append(ids[i])
            i += 1
    return out


def assert_greedy_matches(hf, ours, hf_kwargs: dict, ours_kwargs: dict, n: int = 16) -> None:
    """n greedy tokens (eos ignored on both sides) of transformers' generate and ours, equal token for token."""
    with torch.no_grad():
        ref = hf.generate(**hf_kwargs, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    ref = ref[:, hf_kwargs["input_ids"].shape[1]:]
    assert ours.generate(**ours_kwargs, max_new_tokens=n, do_sample=False).tolist() == ref.tolist()


def assert_round_trip(model, folder, **inputs) -> None:
    """save_pretrained then from_pretrained: the same config and bit-identical logits on `inputs`."""
    model.save_pretrained(folder)
    again = pmod.from_pretrained(folder, dtype=torch.float32)
    assert again.config == model.config
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, again(**inputs).logits)
