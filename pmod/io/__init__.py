"""Loading and saving checkpoints: layout detection, key maps, safetensors (sharded), dtype and devices.

Supported layouts (detected from `config.json`):
- ours (`model_type: pmod`), written by `save_pretrained`;
- official p-MoD (`model_type: pmod_llava_llama`);
- original LLaVA-1.5 / LLaVA-NeXT (`llava_llama`, `llava_mistral`, `llava_qwen`), dense;
- transformers llava-hf (`llava`, `llava_next`), dense;
- transformers LLaVA-OneVision (`llava_onevision`) and Qwen2.5-VL (`qwen2_5_vl`), dense (`pmod.io.hf_vlm`).
A dense checkpoint becomes a p-MoD model with `mod=ModConfig(...)` (routers inserted, zero init).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from pmod.config import CONFIG_NAME, MODEL_TYPE, ModConfig, PmodConfig, VisionConfig
from pmod.io.atomic import check_writable_dir
from pmod.io.errors import CheckpointError, CheckpointNotFoundError
from pmod.io.files import check_finite as _check_finite
from pmod.io.files import config_path, read_tensors, resolve_folder, weight_files, write_checkpoint
from pmod.io.keymaps import CLIP_TOWER, LLAVA, LLAVA_HF, OFFICIAL_PMOD, OURS, KeyMap
from pmod.io.legacy import pmod_config_from_llava, pmod_config_from_llava_hf, pmod_config_from_official
from pmod.io.towers import BUILTIN_TOWERS, builtin_tower

__all__ = ["from_pretrained", "save_pretrained", "load_config", "detect_layout", "read_mapped", "CheckpointError",
           "CheckpointNotFoundError"]


CLIP_VISION_FIELDS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels", "image_size",
    "patch_size", "hidden_act", "layer_norm_eps", "attention_dropout", "projection_dim", "initializer_range",
    "initializer_factor",
)
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
           "float64": torch.float64, "double": torch.float64}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"{path} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(raw).__name__}")
    return raw


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
    if mt == "llava_onevision":
        return "onevision_hf"
    if mt in ("qwen2_5_vl", "qwen3_vl"):
        return mt
    raise CheckpointError(
        f"unknown checkpoint layout: config.json has model_type={mt!r}; pmod reads 'pmod' (ours), "
        f"'pmod_llava_llama' (official p-MoD), 'llava_llama'/'llava_mistral'/'llava_qwen' (original LLaVA), "
        f"'llava'/'llava_next' (transformers llava-hf) and 'llava_onevision' / 'qwen2_5_vl' / 'qwen3_vl' (transformers)"
    )


def clip_vision_config(tower: str, base: Path, select_layer: int = -2, select_feature: str = "patch") -> VisionConfig:
    """VisionConfig of a CLIP / SigLIP tower named by a folder (relative to the checkpoint, or absolute) or a hub
    id. A hub id that is not in the local cache falls back to pmod's built-in config of that tower, if any."""
    try:
        folder = resolve_folder(tower, base, files=[CONFIG_NAME], what="vision tower", patterns=["*.json"])
    except CheckpointNotFoundError as e:
        known = builtin_tower(tower)
        if known is None:
            raise CheckpointNotFoundError(
                f"{e}. pmod has built-in configs only for {', '.join(BUILTIN_TOWERS)}; for {tower!r} download its config "
                f"(`hf download {tower} --include '*.json'`, or the whole tower) or pass a local folder") from None
        return VisionConfig(backend=known["backend"], name=tower, clip=dict(known["config"]), select_layer=select_layer,
                            select_feature=select_feature, image_mean=known["image_mean"], image_std=known["image_std"])
    raw = _read_json(folder / CONFIG_NAME)
    mt = raw.get("model_type")
    vis = raw.get("vision_config", raw) if mt in ("clip", "siglip") else raw
    backend = "siglip" if mt in ("siglip", "siglip_vision_model") else "clip"
    pre = folder / "preprocessor_config.json"
    extra = {}
    if pre.exists():
        p = _read_json(pre)
        extra = {"image_mean": tuple(p.get("image_mean", VisionConfig.image_mean)), "image_std": tuple(p.get("image_std", VisionConfig.image_std))}
    return VisionConfig(
        backend=backend, name=tower, clip={k: vis[k] for k in CLIP_VISION_FIELDS if k in vis},
        select_layer=select_layer, select_feature=select_feature, **extra,
    )


def _config_and_keymap(folder: Path, vision_tower: str | None = None) -> tuple[PmodConfig, KeyMap, str]:
    path = config_path(folder)
    raw = _read_json(path)
    layout = detect_layout(raw)
    try:
        if layout == "pmod":
            return PmodConfig.from_dict(raw), OURS, layout
        if layout in ("llava_hf", "onevision_hf", "qwen2_5_vl", "qwen3_vl"):
            pre = folder / "preprocessor_config.json"
            pre_raw = _read_json(pre) if pre.exists() else None
            if layout == "onevision_hf":
                from pmod.io.hf_vlm import ONEVISION_HF, pmod_config_from_onevision_hf

                return pmod_config_from_onevision_hf(raw, pre_raw), ONEVISION_HF, layout
            if layout in ("qwen2_5_vl", "qwen3_vl"):
                from pmod.io.hf_vlm import QWEN2_5_VL, pmod_config_from_qwen2_5_vl, pmod_config_from_qwen3_vl

                translate = pmod_config_from_qwen2_5_vl if layout == "qwen2_5_vl" else pmod_config_from_qwen3_vl
                return translate(raw, pre_raw), QWEN2_5_VL, layout
            return pmod_config_from_llava_hf(raw, pre_raw), LLAVA_HF, layout
        if "mm_vision_tower" not in raw:
            raise CheckpointError(f"{path}: a {raw.get('model_type')} config needs mm_vision_tower")
        vision = clip_vision_config(
            vision_tower or raw["mm_vision_tower"], folder, raw.get("mm_vision_select_layer", -2), raw.get("mm_vision_select_feature", "patch")
        )
        if layout == "llava":
            return pmod_config_from_llava(raw, vision), LLAVA, layout
        return pmod_config_from_official(raw, vision), OFFICIAL_PMOD, layout
    except CheckpointError:
        raise
    except KeyError as e:
        raise CheckpointError(f"{path}: required field {e} is missing") from None
    except (ValueError, TypeError, AttributeError) as e:  # the config's own validation, naming the field
        raise CheckpointError(f"{path}: {e}") from None


def load_config(path: str | os.PathLike, vision_tower: str | None = None) -> PmodConfig:
    """The model config of a checkpoint folder or hub id, without reading any weights."""
    folder = resolve_folder(str(path), None, files=[CONFIG_NAME], what="checkpoint", patterns=["*.json"])
    return _config_and_keymap(folder, vision_tower)[0]


def _resolve_dtype(dtype) -> torch.dtype | None:
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
        if name not in _DTYPES:
            raise ValueError(f"dtype={dtype!r}: expected 'auto' or one of {sorted(_DTYPES)} (or a torch floating dtype)")
        return _DTYPES[name]
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype={dtype!r}: expected 'auto', a name such as 'bfloat16', or a torch floating dtype")
    return dtype


def resolve_device(device) -> torch.device:
    """A torch.device that exists on this machine, or a ValueError saying why not (before anything is loaded)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device={device!r} is not a device name (cpu, cuda, cuda:1, mps, ...): {e}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} but no CUDA GPU is available here (torch.cuda.is_available() is False); "
                             f"use device='cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device={device!r} but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device={device!r} but MPS is not available here")
    elif dev.type not in ("cpu", "cuda", "mps", "meta") and not hasattr(torch, dev.type):
        raise ValueError(f"device={device!r}: device type {dev.type!r} is not available here")
    return dev


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
    check_finite: bool = True,
):
    """Load any supported checkpoint. The model is built on the meta device, then each tensor is read,
    renamed, checked against its expected shape and dtype kind (and, with `check_finite`, for NaN / Inf: one
    reduction pass per tensor), cast and placed; anything left over or missing is an error naming the keys
    as the checkpoint file names them. `dtype='auto'` keeps the checkpoint's floating dtype."""
    from accelerate import init_empty_weights

    from pmod.modeling.llava import PmodForConditionalGeneration

    want_dtype = _resolve_dtype(dtype)  # argument errors before any file is read
    target_device = resolve_device(device) if device is not None and device_map is None else torch.device("cpu")
    folder = resolve_folder(str(path), None, files=[CONFIG_NAME], what="checkpoint")
    cfg, keymap, layout = _config_and_keymap(folder, vision_tower)
    cfg = config or cfg
    if mod is not None:
        cfg = cfg.replace(mod=mod)
    with init_empty_weights(include_buffers=False):
        model = PmodForConditionalGeneration(cfg, attn_backend=attn_backend)
    expected = {k: v for k, v in model.state_dict(keep_vars=True).items()}

    files = weight_files(folder, layout)
    state = read_mapped(files, keymap, expected, drop_routers=mod is not None, check_finite=check_finite)
    tower_files = None
    if layout != "pmod" and not any(k.startswith("vision_tower.") for k in state):
        tower = resolve_folder(cfg.vision.name, folder, files=[], what="vision tower")
        tower_files = weight_files(tower)
        state.update(read_mapped(tower_files, CLIP_TOWER, expected, check_finite=check_finite))
    tied = cfg.text.tie_word_embeddings
    new_routers = {k: torch.zeros(expected[k].shape) for k in expected if ".routers." in k and k not in state and mod is not None}
    state.update(new_routers)  # zero init: w = norm_bias, STRing starts as the identity
    missing = sorted(k for k in expected if k not in state and not (tied and k == "lm_head.weight"))
    if missing:
        named = _checkpoint_names(missing, keymap, files, cfg, tower_files)
        raise CheckpointError(f"{folder}: {len(missing)} parameter(s) missing from the checkpoint: {_show(named)}")

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


def _checkpoint_names(missing: list[str], keymap: KeyMap, files: list[Path], cfg: PmodConfig, tower_files) -> list[str]:
    """Our parameter names -> the names the checkpoint file would give them (ours in brackets where they differ).
    Where a layer may be written two ways (official MoD layers under `.decoder_layer.`), the config decides."""
    present = set()
    for f in files:
        present |= set(_keys_of(f))
    mod_layers = set(cfg.mod_ratios)
    out = []
    for k in missing:
        km = CLIP_TOWER if tower_files is not None and k.startswith("vision_tower.") else keymap
        cands = km.source_names(k)
        if len(cands) > 1:
            layer = k.split(".")[2] if k.startswith("language_model.layers.") else None
            if layer is not None and layer.isdigit():
                cands.sort(key=lambda c: (".decoder_layer." in c) != (int(layer) in mod_layers))
            else:  # the spelling whose prefix the file already uses (old vs new llava-hf names)
                cands.sort(key=lambda c: not any(p.startswith(c.split(".")[0] + ".") for p in present))
        name = cands[0] if cands else k
        out.append(name if name == k else f"{name} (pmod: {k})")
    return out


def _keys_of(path: Path) -> list[str]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                return list(f.keys())
        except Exception:
            return []
    return []


def read_mapped(files: list[Path], keymap: KeyMap, expected: dict[str, torch.Tensor], drop_routers: bool = False,
                check_finite: bool = True) -> dict[str, torch.Tensor]:
    """Read `files`, rename by `keymap`, check every tensor against `expected` shapes and dtype kinds (and for
    NaN / Inf with `check_finite`); raise naming the keys as the checkpoint names them."""
    out, unexpected, bad_shape, bad_kind = {}, [], [], []
    for f in files:
        tensors = read_tensors(f)
        try:
            mapping = keymap.remap(tensors.keys())
        except CheckpointError as e:
            raise CheckpointError(f"{f}: {e}") from None
        for src, dst in mapping.items():
            if dst not in expected:
                if drop_routers and ".routers." in dst:  # re-scheduled: this layer no longer routes
                    continue
                unexpected.append(f"{src} -> {dst}" if src != dst else src)
                continue
            t = tensors[src]
            if not isinstance(t, torch.Tensor):
                bad_kind.append(f"{src}: a {type(t).__name__}, not a tensor")
                continue
            if tuple(t.shape) != tuple(expected[dst].shape):
                bad_shape.append(f"{src}: checkpoint {tuple(t.shape)} vs model {tuple(expected[dst].shape)}")
                continue
            if t.is_floating_point() != expected[dst].is_floating_point():
                bad_kind.append(f"{src}: checkpoint dtype {t.dtype} vs model {expected[dst].dtype}")
                continue
            if check_finite:
                _check_finite(src, t, f)
            out[dst] = t
    if bad_kind:
        raise CheckpointError(f"{len(bad_kind)} tensor(s) have the wrong kind of dtype: {_show(bad_kind)}")
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
    """Write config.json and (sharded) safetensors in our layout, atomically as a whole (`pmod.io.commit`): a
    crash at any instant leaves the previous complete checkpoint or this one. Reloading gives identical outputs."""
    folder = check_writable_dir(folder, "save_pretrained folder")
    state = {k: v for k, v in model.state_dict().items()}
    if model.config.text.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    meta = [k for k, v in state.items() if v.is_meta]
    if meta:
        raise ValueError(f"save_pretrained: {len(meta)} tensor(s) are on the meta device (never loaded): {_show(meta)}")
    write_checkpoint(folder, model.config.to_dict(), state, max_shard_size)
