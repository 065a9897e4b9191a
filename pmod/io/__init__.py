"""Loading and saving checkpoints: layout detection, key maps, safetensors (sharded), dtype and devices.

Supported layouts (detected from `config.json`):
- ours (`model_type: pmod`), written by `save_pretrained`;
- official p-MoD (`model_type: pmod_llava_llama`);
- original LLaVA-1.5 / LLaVA-NeXT (`llava_llama`, `llava_mistral`, `llava_qwen`), dense;
- transformers llava-hf (`llava`, `llava_next`), dense.
A dense checkpoint becomes a p-MoD model with `mod=ModConfig(...)` (routers inserted, zero init).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from pmod.config import CONFIG_NAME, MODEL_TYPE, ModConfig, PmodConfig, VisionConfig
from pmod.io.files import read_tensors, resolve_folder, weight_files, write_safetensors_sharded
from pmod.io.keymaps import CLIP_TOWER, LLAVA, LLAVA_HF, OFFICIAL_PMOD, OURS, KeyMap
from pmod.io.legacy import pmod_config_from_llava, pmod_config_from_llava_hf, pmod_config_from_official

__all__ = ["from_pretrained", "save_pretrained", "load_config", "detect_layout", "read_mapped", "CheckpointError"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked: missing, corrupt or not matching its config."""


CLIP_VISION_FIELDS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels", "image_size",
    "patch_size", "hidden_act", "layer_norm_eps", "attention_dropout", "projection_dim", "initializer_range",
    "initializer_factor",
)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None


def detect_layout(raw: dict[str, Any]) -> str:
    mt = raw.get("model_type")
    if mt == MODEL_TYPE:
        return "pmod"
    if mt == "pmod_llava_llama":
        return "official_pmod"
    if mt in ("llava_llama", "llava_mistral", "llava_qwen"):
        return "llava"
    if mt in ("llava", "llava_next"):
        return "llava_hf"
    raise CheckpointError(
        f"unknown checkpoint layout: config.json has model_type={mt!r}; pmod reads 'pmod' (ours), "
        f"'pmod_llava_llama' (official p-MoD), 'llava_llama'/'llava_mistral'/'llava_qwen' (original LLaVA) "
        f"and 'llava'/'llava_next' (transformers llava-hf)"
    )


def clip_vision_config(tower: str, base: Path, select_layer: int = -2, select_feature: str = "patch") -> VisionConfig:
    """VisionConfig of a CLIP tower named by a folder (relative to the checkpoint, or absolute) or a hub id."""
    folder = resolve_folder(tower, base, files=[CONFIG_NAME], what="vision tower")
    raw = _read_json(folder / CONFIG_NAME)
    vis = raw.get("vision_config", raw) if raw.get("model_type") == "clip" else raw
    pre = folder / "preprocessor_config.json"
    extra = {}
    if pre.exists():
        p = _read_json(pre)
        extra = {"image_mean": tuple(p.get("image_mean", VisionConfig.image_mean)), "image_std": tuple(p.get("image_std", VisionConfig.image_std))}
    return VisionConfig(
        backend="clip", name=tower, clip={k: vis[k] for k in CLIP_VISION_FIELDS if k in vis},
        select_layer=select_layer, select_feature=select_feature, **extra,
    )


def _config_and_keymap(folder: Path, vision_tower: str | None = None) -> tuple[PmodConfig, KeyMap, str]:
    raw = _read_json(folder / CONFIG_NAME)
    layout = detect_layout(raw)
    if layout == "pmod":
        return PmodConfig.from_dict(raw), OURS, layout
    if layout == "llava_hf":
        pre = folder / "preprocessor_config.json"
        return pmod_config_from_llava_hf(raw, _read_json(pre) if pre.exists() else None), LLAVA_HF, layout
    if "mm_vision_tower" not in raw:
        raise CheckpointError(f"{folder / CONFIG_NAME}: a {raw.get('model_type')} config needs mm_vision_tower")
    vision = clip_vision_config(
        vision_tower or raw["mm_vision_tower"], folder, raw.get("mm_vision_select_layer", -2), raw.get("mm_vision_select_feature", "patch")
    )
    if layout == "llava":
        return pmod_config_from_llava(raw, vision), LLAVA, layout
    return pmod_config_from_official(raw, vision), OFFICIAL_PMOD, layout


def load_config(path: str | os.PathLike, vision_tower: str | None = None) -> PmodConfig:
    """The model config of a checkpoint folder or hub id, without reading any weights."""
    folder = resolve_folder(str(path), None, files=[CONFIG_NAME], what="checkpoint")
    return _config_and_keymap(folder, vision_tower)[0]


def _resolve_dtype(dtype, folder: Path) -> torch.dtype | None:
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return dtype


def from_pretrained(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | str | None = "auto",
    device: torch.device | str | None = None,
    device_map: str | dict | None = None,
    attn_backend: str = "auto",
    vision_tower: str | None = None,
    config: PmodConfig | None = None,
    mod: ModConfig | None = None,
):
    """Load any supported checkpoint. The model is built on the meta device, then each tensor is read,
    renamed, checked against its expected shape, cast and placed; anything left over or missing is an
    error naming the keys. `dtype='auto'` keeps the checkpoint's floating dtype."""
    from accelerate import init_empty_weights

    from pmod.modeling.llava import PmodForConditionalGeneration

    folder = resolve_folder(str(path), None, files=[CONFIG_NAME], what="checkpoint")
    cfg, keymap, layout = _config_and_keymap(folder, vision_tower)
    cfg = config or cfg
    if mod is not None:
        cfg = cfg.replace(mod=mod)
    with init_empty_weights(include_buffers=False):
        model = PmodForConditionalGeneration(cfg, attn_backend=attn_backend)
    expected = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    want_dtype = _resolve_dtype(dtype, folder)
    target_device = torch.device(device) if device is not None and device_map is None else torch.device("cpu")

    state = read_mapped(weight_files(folder), keymap, expected, drop_routers=mod is not None)
    if layout != "pmod" and not any(k.startswith("vision_tower.") for k in state):
        tower = resolve_folder(cfg.vision.name, folder, files=[], what="vision tower")
        state.update(read_mapped(weight_files(tower), CLIP_TOWER, expected))
    tied = cfg.text.tie_word_embeddings
    new_routers = {k: torch.zeros(expected[k].shape) for k in expected if ".routers." in k and k not in state and mod is not None}
    state.update(new_routers)  # zero init: w = norm_bias, STRing starts as the identity
    missing = sorted(k for k in expected if k not in state and not (tied and k == "lm_head.weight"))
    if missing:
        raise CheckpointError(f"{folder}: {len(missing)} parameter(s) missing from the checkpoint: {_show(missing)}")

    if want_dtype is None:
        want_dtype = state["language_model.embed_tokens.weight"].dtype
    for k, t in state.items():
        state[k] = t.to(device=target_device, dtype=want_dtype if t.is_floating_point() else t.dtype)
    model.load_state_dict(state, strict=False, assign=True)
    if tied:
        model.lm_head.weight = model.language_model.embed_tokens.weight
    model.to(target_device)  # buffers built off-meta
    model.eval()
    if device_map is not None:
        model = _dispatch(model, device_map)
    return model


def read_mapped(files: list[Path], keymap: KeyMap, expected: dict[str, torch.Tensor], drop_routers: bool = False) -> dict[str, torch.Tensor]:
    """Read `files`, rename by `keymap`, check every tensor against `expected` shapes; raise naming the keys."""
    out, unexpected, bad_shape = {}, [], []
    for f in files:
        tensors = read_tensors(f)
        mapping = keymap.remap(tensors.keys())
        for src, dst in mapping.items():
            if dst not in expected:
                if drop_routers and ".routers." in dst:  # re-scheduled: this layer no longer routes
                    continue
                unexpected.append(f"{src} -> {dst}" if src != dst else src)
                continue
            t = tensors[src]
            if tuple(t.shape) != tuple(expected[dst].shape):
                bad_shape.append(f"{src}: checkpoint {tuple(t.shape)} vs model {tuple(expected[dst].shape)}")
                continue
            out[dst] = t
    if bad_shape:
        raise CheckpointError(f"{len(bad_shape)} tensor(s) do not match the config's shapes: {_show(bad_shape)}")
    if unexpected:
        raise CheckpointError(f"{len(unexpected)} checkpoint tensor(s) have no place in the model built from its config: {_show(unexpected)}")
    return out


def _show(items: list[str], n: int = 12) -> str:
    more = f" ... and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def _dispatch(model, device_map):
    from accelerate import dispatch_model, infer_auto_device_map

    if isinstance(device_map, str):
        if device_map in ("cpu", "cuda", "mps") or device_map.startswith("cuda:"):
            return model.to(device_map)
        if device_map != "auto":
            raise ValueError(f"device_map={device_map!r}; expected 'auto', a device name or a dict")
        device_map = infer_auto_device_map(model, no_split_module_classes=["DecoderLayer", "CLIPEncoderLayer"])
    return dispatch_model(model, device_map=device_map)


def save_pretrained(model, folder: str | os.PathLike, max_shard_size: str | int = "5GB") -> None:
    """Write config.json and (sharded) safetensors in our layout; reloading gives identical outputs."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save(folder)
    state = {k: v for k, v in model.state_dict().items()}
    if model.config.text.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    write_safetensors_sharded(state, folder, max_shard_size)
