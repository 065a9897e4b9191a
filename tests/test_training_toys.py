"""Tiny models and datasets, written to disk, for the training tests (and a check of the toys themselves).

Everything is offline: a word-level tokenizer built with `tokenizers`, PNGs drawn with PIL, random
tiny weights. The answers depend on the image (its colour) so that a few dozen CPU steps visibly learn.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_config, tiny_tokenizer
from PIL import Image
from safetensors.torch import load_file



COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (40, 60, 230)}
COUNTS = ("one", "two", "three", "four")


def write_model(folder: Path, seed: int = 0, layers: int = 4, dense: bool = False, anyres: bool = False) -> Path:
    """Our layout (config.json + safetensors) plus a tokenizer: what `pmod train --model` reads. `anyres`:
    LLaVA-NeXT's layout (crops on grids of 42 px tiles, spatial_unpad with image_newline)."""
    from pmod.modeling.llava import PmodForConditionalGeneration

    torch.manual_seed(seed)
    cfg = tiny_config(layers=layers, schedule="none" if dense else "shiftedcos")
    if anyres:
        cfg = cfg.replace(image_aspect_ratio="anyres", mm_patch_merge_type="spatial_unpad",
                          image_grid_pinpoints=[[42, 84], [84, 42], [84, 84]])
    model = PmodForConditionalGeneration(cfg).init_weights(std=0.05)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(str(folder))
    return folder


def write_llm_and_clip(root: Path, seed: int = 0) -> tuple[Path, Path]:
    """A dense transformers Llama folder (with tokenizer) and a CLIP vision tower folder."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                       initializer_range=0.3))  # a "trained" scale: logits can be confident
    llm.save_pretrained(root / "llm")
    tiny_tokenizer().save_pretrained(str(root / "llm"))
    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                            image_size=42, patch_size=14, hidden_act="quick_gelu"))
    clip.save_pretrained(root / "clip")
    # the hub's CLIP checkpoints (transformers 4.x) carry the `vision_model.` prefix that 5.x drops on save
    from safetensors.torch import load_file, save_file

    f = root / "clip" / "model.safetensors"
    save_file({f"vision_model.{k}": v for k, v in load_file(f).items()}, f, metadata={"format": "pt"})
    return root / "llm", root / "clip"


def write_images(folder: Path) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = {}
    for i, (name, rgb) in enumerate(COLORS.items()):
        size = [(42, 42), (56, 40), (40, 50)][i]  # odd aspect ratios exercise the `pad` pipeline
        Image.new("RGB", size, rgb).save(folder / f"{name}.png")
        names[name] = f"{name}.png"
    return names


def write_data(root: Path, n: int = 24, text_only_every: int = 4, caption: bool = False, extra: list | None = None) -> Path:
    """LLaVA conversation JSON under root/data.json, images under root/images. Every `text_only_every`-th
    sample has no image; `caption=True` writes pre-training style (image -> colour word) samples."""
    names = write_images(root / "images")
    recs = []
    for i in range(n):
        color = list(COLORS)[i % 3]
        if caption:
            recs.append({"id": f"c{i}", "image": names[color], "conversations": [
                {"from": "human", "value": "<image>"}, {"from": "gpt", "value": f"{color} {color}"}]})
        elif text_only_every and i % text_only_every == text_only_every - 1:
            recs.append({"id": f"t{i}", "conversations": [
                {"from": "human", "value": "how many ?"}, {"from": "gpt", "value": COUNTS[i % 4]}]})
        else:
            turns = [{"from": "human", "value": "<image>\nwhat color is this ?"}, {"from": "gpt", "value": color}]
            if i % 2:
                turns += [{"from": "human", "value": "is this red ?"}, {"from": "gpt", "value": "yes" if color == "red" else "no"}]
            recs.append({"id": f"s{i}", "image": names[color], "conversations": turns})
    recs += extra or []
    (root / "data.json").write_text(json.dumps(recs))
    return root / "data.json"


def toy_config(tmp: Path, model: Path, data: Path, **kw):
    from pmod.training import resolve_config

    base = {"model": str(model), "data": str(data), "image_folder": str(data.parent / "images"), "output": str(tmp / "run"),
            "per_device_batch_size": 4, "max_steps": 30, "learning_rate": 3e-3, "warmup_ratio": 0.0, "logging_steps": 1,
            "save_steps": 1000, "num_workers": 0, "seed": 0, "template": "chat_nosys"}
    base.update(kw)
    return resolve_config(**base)


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "train_log.jsonl").read_text().splitlines()]


def _logs(run: Path, key: str) -> list[float]:
    return [json.loads(x)[key] for x in (run / "train_log.jsonl").read_text().splitlines()]


def assert_same_training(a: Path, b: Path, init: Path) -> None:
    """Same losses and gradient norms at every step (float32 rounding aside: the global-target loss
    normalisation makes the gradient independent of how a step's rows are split), and the same weights.
    Weights get a looser, relative check: Adam divides by sqrt(v), which amplifies rounding on the few
    weights whose gradient is near zero, so we bound the share of elements that differ by more than 1e-6
    and the largest difference against how far training moved the weights."""
    assert _logs(a, "loss") == pytest.approx(_logs(b, "loss"), rel=1e-6)
    assert _logs(a, "grad_norm") == pytest.approx(_logs(b, "grad_norm"), rel=1e-5)
    wa, wb, w0 = load_file(a / "model.safetensors"), load_file(b / "model.safetensors"), load_file(init / "model.safetensors")
    diff = torch.cat([(wa[k] - wb[k]).abs().flatten() for k in wa])
    moved = max(float((wa[k] - w0[k]).abs().max()) for k in wa)
    assert float((diff > 1e-6).float().mean()) < 1e-3 and float(diff.max()) < 0.01 * moved, (float(diff.max()), moved)


def test_toys_build_and_run_a_forward(tmp_path):
    from pmod.training.build import build

    model_dir = write_model(tmp_path / "m")
    data = write_data(tmp_path / "d", n=6)
    built = build(toy_config(tmp_path, model_dir, data))
    assert built.source == "pmod" and not built.model.config.is_dense
    llm, clip = write_llm_and_clip(tmp_path / "hf")
    built = build(toy_config(tmp_path, llm, data, vision_tower=str(clip), stage="pretrain", template=None))
    assert built.source == "llm+clip" and built.model.config.is_dense and built.template.name == "plain"
