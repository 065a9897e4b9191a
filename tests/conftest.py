"""Shared test fixtures: paths to the official reference fixtures and tiny configs."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
OFFICIAL = REPO / "tests" / "fixtures" / "official-pmod-tiny"  # the official code's outputs; see its PROVENANCE.md


@pytest.fixture(scope="session")
def official_dir() -> Path:
    if not (OFFICIAL / "manifest.json").is_file():
        pytest.fail(f"official fixtures missing at {OFFICIAL} (they are part of the repository)")
    return OFFICIAL


@pytest.fixture(autouse=True)
def _seed_and_threads():
    """Seed every test; one intra-op thread: tiny matmuls on a small shared CPU are far faster without hand-offs."""
    torch.manual_seed(0)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_config(layers: int = 4, ratios: dict | None = None, schedule: str = "shiftedcos", **text_overrides):
    """A small random p-MoD config: CLIP 32-wide at 28 px (4 patches of 14), 64-wide GQA decoder."""
    from pmod.config import ModConfig, PmodConfig, TextConfig, VisionConfig

    text = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5)
    text.update(text_overrides)
    return PmodConfig(
        text=TextConfig(**text),
        vision=VisionConfig(clip=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                                      image_size=42, patch_size=14, hidden_act="quick_gelu")),
        mod=ModConfig(schedule=schedule, layer_ratios=ratios),
        model_max_length=512,
    )


def tiny_model(seed: int = 0, router_std: float = 0.5, **kw):
    """A tiny model with random weights and random (non-zero) routers, so routing actually selects."""
    from pmod.modeling.llava import PmodForConditionalGeneration

    torch.manual_seed(seed)
    model = PmodForConditionalGeneration(tiny_config(**kw)).init_weights(std=0.1).eval()
    with torch.no_grad():
        for r in model.language_model.routers.values():
            r.weight.normal_(0, router_std)
            r.bias.normal_(0, 0.1)
    return model


def make_batch(rows: list[tuple[int, int, int]], vocab: int = 97, seed: int = 0, side: str = "right"):
    """rows: (text tokens before the image, number of images (0/1), text tokens after). Returns ids, mask, n_images."""
    from pmod.packing import IMAGE_TOKEN_INDEX

    g = torch.Generator().manual_seed(seed)
    seqs = []
    for before, n_img, after in rows:
        ids = [1] + torch.randint(3, vocab, (before,), generator=g).tolist() + [IMAGE_TOKEN_INDEX] * n_img
        ids += torch.randint(3, vocab, (after,), generator=g).tolist()
        seqs.append(ids)
    T = max(map(len, seqs))
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(0, len(s)) if side == "right" else slice(T - len(s), T)
        ids[i, sl] = torch.tensor(s)
        mask[i, sl] = 1
    return ids, mask, sum(r[1] for r in rows)


def tiny_tokenizer(words: list[str] | None = None):
    """A word-level tokenizer (tokenizers library) wrapped for transformers, with <s> </s> <pad> <unk>.

    Punctuation splits off; "<image>" is never a token (the processor replaces it by -200)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    base = ["<pad>", "<s>", "</s>", "<unk>"]
    words = words or ("a chat between curious user and an artificial intelligence assistant the gives helpful detailed "
                      "polite answers to user's questions USER ASSISTANT : . ? , ' what is in this image color shape "
                      "red green blue yes no how many one two three four").split()
    vocab = {w: i for i, w in enumerate(dict.fromkeys(base + words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    from tokenizers import decoders

    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


class _Payload:
    """Unpickling this runs `open(marker, 'w')`: the marker file appears iff a loader executed pickled code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def planted_pickle(path, marker) -> None:
    """Write a pickle (in torch.save's zip format, as a real optimizer.bin or custom_checkpoint_0.pkl would be)
    whose unpickling creates `marker`."""
    torch.save({"state": _Payload(marker)}, path)


def official_anyres_checkpoint(official_dir: Path, tmp_path: Path) -> Path:
    """The official tiny checkpoint as LLaVA-NeXT (anyres + spatial_unpad): its weights plus image_newline."""
    import shutil

    from safetensors.torch import load_file, save_file

    ck = tmp_path / "anyres"
    shutil.copytree(official_dir / "checkpoint", ck)
    shutil.copy(official_dir / "anyres" / "config.json", ck / "config.json")
    sd = load_file(ck / "model.safetensors")
    sd.update(load_file(official_dir / "anyres" / "image_newline.safetensors"))
    save_file(sd, ck / "model.safetensors")
    return ck
