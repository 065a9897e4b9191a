"""The model, tokenizer and processor a run starts from.

Two sources, as LLaVA and p-MoD train:
- a dense LLM folder (transformers `llama`, `qwen2`, `mistral` layout) plus a CLIP tower: the
  LLaVA model is assembled here, the projector fresh (PyTorch's default Linear init, as LLaVA builds
  it) or read from a pre-trained `mm_projector.bin` / `.safetensors`, routers at zero;
- an existing LLaVA / p-MoD / pmod checkpoint, through `pmod.from_pretrained` (which converts a dense
  one to p-MoD when a `mod` schedule is asked for).
Every tensor read goes through the declarative key maps of `pmod.io`, so unknown or missing keys fail
loudly. Models are built on the meta device and filled once, in float32 (mixed precision is the
accelerator's job).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from pmod.config import ModConfig, PmodConfig
from pmod.io import CheckpointError, clip_vision_config, load_config, read_mapped
from pmod.io.files import read_tensors, resolve_folder, weight_files
from pmod.io.keymaps import CLIP_TOWER, LLAVA
from pmod.io.legacy import text_config_from_llama
from pmod.modeling.llava import PmodForConditionalGeneration, from_pretrained
from pmod.modeling.projector import build_projector
from pmod.multimodal.anyres import pinpoints_from_grids
from pmod.multimodal.processor import PmodProcessor, load_tokenizer
from pmod.multimodal.templates import Template, get_template
from pmod.training.config import TrainConfig

__all__ = ["Built", "build", "load_projector", "LLM_TYPES"]

LLM_TYPES = ("llama", "qwen2", "mistral")
PROJECTOR_FILES = ("mm_projector.safetensors", "mm_projector.bin")


@dataclass
class Built:
    model: PmodForConditionalGeneration
    tokenizer: object
    processor: PmodProcessor
    template: Template
    source: str  # "llm+clip" or the checkpoint layout


def _resolve_mod(cfg: TrainConfig, dense: bool) -> ModConfig | None:
    """The schedule to (re)build with, or None to keep the checkpoint's."""
    if cfg.mod is not None:
        return ModConfig(**cfg.mod)
    if cfg.stage == "finetune" and dense:
        return ModConfig()  # the paper's: shiftedcos 0.85 / 0.15, average 0.5, TanhNorm, zero-init routers
    return None


def _model_from_llm(folder: Path, raw: dict, cfg: TrainConfig) -> PmodForConditionalGeneration:
    from accelerate import init_empty_weights

    if not cfg.vision_tower:
        raise ValueError(f"{folder} is a plain {raw['model_type']} LLM: pass --vision-tower (a CLIP folder or hub id)")
    vision = clip_vision_config(cfg.vision_tower, folder, cfg.vision_select_layer, "patch")
    aspect = cfg.image_aspect_ratio or "pad"
    merge = cfg.mm_patch_merge_type or ("spatial_unpad" if aspect == "anyres" else "flat")
    pc = PmodConfig(
        text=text_config_from_llama(raw), vision=vision, mod=_resolve_mod(cfg, True) or ModConfig(schedule="none"),
        projector_type=cfg.projector_type, image_aspect_ratio=aspect, mm_patch_merge_type=merge,
        image_grid_pinpoints=pinpoints_from_grids(cfg.grids, vision.image_size) if aspect == "anyres" else None,
        model_max_length=cfg.model_max_length or 2048, padding_side="right",
    )
    with init_empty_weights(include_buffers=False):
        model = PmodForConditionalGeneration(pc, attn_backend=cfg.attn_backend)
    expected = dict(model.state_dict(keep_vars=True))
    state = read_mapped(weight_files(folder), LLAVA, expected)
    tower = resolve_folder(cfg.vision_tower, folder, files=[], what="vision tower")
    state.update(read_mapped(weight_files(tower), CLIP_TOWER, expected))
    state.update(_fresh_modules(pc))
    tied = pc.text.tie_word_embeddings
    missing = sorted(k for k in expected if k not in state and not (tied and k == "lm_head.weight"))
    if missing:
        raise CheckpointError(f"{folder} + {tower}: {len(missing)} parameter(s) not found: {missing[:12]}")
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False, assign=True)
    if tied:
        model.lm_head.weight = model.language_model.embed_tokens.weight
    return model.to("cpu")


def _fresh_modules(pc: PmodConfig) -> dict[str, torch.Tensor]:
    """What a dense LLM + CLIP does not have: projector (PyTorch default init, as LLaVA), routers (zero
    or N(0, router_init_std)), image_newline (N(0, 1/C), as LLaVA-NeXT). Drawn from the seeded RNG."""
    proj = build_projector(pc.projector_type, pc.vision.hidden_size, pc.text.hidden_size)
    out = {f"projector.{k}": v.detach() for k, v in proj.state_dict().items()}
    C = pc.text.hidden_size
    for i in pc.mod_ratios:
        out[f"language_model.routers.{i}.weight"] = torch.randn(1, C) * pc.mod.router_init_std
        if pc.mod.router_bias:
            out[f"language_model.routers.{i}.bias"] = torch.zeros(1)
    if pc.uses_image_newline:
        out["image_newline"] = torch.randn(C) * C**-0.5
    return out


def load_projector(model: PmodForConditionalGeneration, path: str | Path) -> None:
    """Read a pre-trained projector: LLaVA's `mm_projector.bin` (keys `model.mm_projector.{0,2}.*`), our
    `mm_projector.safetensors` (the same keys), or a folder holding either."""
    p = Path(path)
    if p.is_dir():
        found = [p / f for f in PROJECTOR_FILES if (p / f).exists()]
        if not found:
            raise FileNotFoundError(f"{p}: no {' or '.join(PROJECTOR_FILES)}")
        p = found[0]
    if not p.is_file():
        raise FileNotFoundError(f"pre-trained projector {p} not found")
    own = dict(model.projector.state_dict())
    state, unknown = {}, []
    for k, v in read_tensors(p).items():
        name = k.removeprefix("base_model.model.").removeprefix("model.").removeprefix("mm_projector.").removeprefix("projector.")
        if name in own:
            state[name] = v
        else:
            unknown.append(k)
    bad = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in state.items() if v.shape != own[k].shape]
    missing = sorted(set(own) - set(state))
    if unknown or bad or missing:
        raise CheckpointError(f"{p} does not fit the {model.config.projector_type} projector: unknown keys {unknown}, "
                              f"missing {missing}, shape mismatches {bad}")
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v)


def build(cfg: TrainConfig) -> Built:
    folder = resolve_folder(cfg.model, None, files=["config.json"], what="model")
    raw = json.loads((folder / "config.json").read_text())
    if raw.get("model_type") in LLM_TYPES:
        model, source = _model_from_llm(folder, raw, cfg), "llm+clip"
    else:
        loaded = load_config(folder, vision_tower=cfg.vision_tower)
        changes = {k: v for k, v in (("image_aspect_ratio", cfg.image_aspect_ratio), ("mm_patch_merge_type", cfg.mm_patch_merge_type),
                                     ("model_max_length", cfg.model_max_length)) if v is not None and v != getattr(loaded, k)}
        if changes.get("image_aspect_ratio") == "anyres" and not loaded.image_grid_pinpoints:
            changes["image_grid_pinpoints"] = pinpoints_from_grids(cfg.grids, loaded.vision.image_size)
        target = loaded.replace(**changes) if changes else loaded
        if target.uses_image_newline and not loaded.uses_image_newline:
            raise ValueError(f"{folder} has no image_newline: anyres + spatial_unpad cannot be switched on for it; start from "
                             f"the LLM with --pretrain-mm-projector instead")
        model = from_pretrained(folder, dtype=torch.float32, device="cpu", attn_backend=cfg.attn_backend,
                                vision_tower=cfg.vision_tower, config=target, mod=_resolve_mod(cfg, loaded.is_dense))
        source = raw.get("model_type", "?")
    if cfg.pretrain_mm_projector:
        load_projector(model, cfg.pretrain_mm_projector)
    template = get_template(cfg.template or ("plain" if cfg.stage == "pretrain" else model.config.conv_template))
    if cfg.stage == "finetune":
        model.config.conv_template = template.name
    tokenizer = load_tokenizer(resolve_folder(cfg.tokenizer or cfg.model, None, files=[], what="tokenizer"))
    if tokenizer.pad_token is None:  # LLaVA v1 pads with unk; otherwise eos (padding is masked anyway)
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
    if len(tokenizer) > model.config.text.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {model.config.text.vocab_size}")
    model.train()
    return Built(model, tokenizer, PmodProcessor(tokenizer, model.config, template=template.name), template, source)
