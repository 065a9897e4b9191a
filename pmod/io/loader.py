"""Reading a checkpoint's weights into a model, and writing ours.

`load_checkpoint(path, build)` builds nothing itself: `build(config)` (the model class, given by `pmod.modeling`)
makes the model on the meta device, then each tensor is read, renamed by the layout's key map, checked and
placed. pmod.io therefore never imports the model, and the model imports pmod.io: one way.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from pmod.config import CONFIG_NAME, ModConfig, PmodConfig
from pmod.io.atomic import check_writable_dir
from pmod.io.errors import CheckpointError, show_names
from pmod.io.files import check_finite as _check_finite
from pmod.io.files import read_tensors, resolve_folder, weight_files, write_checkpoint
from pmod.io.keymaps import CLIP_TOWER, KeyMap
from pmod.io.layouts import config_and_keymap

__all__ = ["load_checkpoint", "save_pretrained", "read_mapped", "resolve_device", "resolve_dtype"]

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
           "float64": torch.float64, "double": torch.float64}


def resolve_dtype(dtype) -> torch.dtype | None:
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


def load_checkpoint(
    path: str | os.PathLike,
    build: Callable[[PmodConfig], nn.Module],
    *,
    dtype: torch.dtype | str | None = "auto",
    device: torch.device | str | None = None,
    device_map: str | dict | None = None,
    vision_tower: str | None = None,
    config: PmodConfig | None = None,
    mod: ModConfig | None = None,
    check_finite: bool = True,
) -> nn.Module:
    """Load any supported checkpoint into `build(config)`. The model is built on the meta device, then each tensor
    is read, renamed, checked against its expected shape and dtype kind (and, with `check_finite`, for NaN / Inf: one
    reduction pass per tensor), cast and placed; anything left over or missing is an error naming the keys
    as the checkpoint file names them. `dtype='auto'` keeps the checkpoint's floating dtype."""
    from accelerate import init_empty_weights

    want_dtype = resolve_dtype(dtype)  # argument errors before any file is read
    target_device = resolve_device(device) if device is not None and device_map is None else torch.device("cpu")
    folder = resolve_folder(str(path), None, files=[CONFIG_NAME], what="checkpoint")
    cfg, keymap, layout = config_and_keymap(folder, vision_tower)
    cfg = config or cfg
    if mod is not None:
        cfg = cfg.replace(mod=mod)
    with init_empty_weights(include_buffers=False):
        model = build(cfg)
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
        raise CheckpointError(f"{folder}: {len(missing)} parameter(s) missing from the checkpoint: {show_names(named)}")

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
        raise CheckpointError(f"{len(bad_kind)} tensor(s) have the wrong kind of dtype: {show_names(bad_kind)}")
    if bad_shape:
        raise CheckpointError(f"{len(bad_shape)} tensor(s) do not match the config's shapes: {show_names(bad_shape)}")
    if unexpected:
        raise CheckpointError(f"{len(unexpected)} checkpoint tensor(s) have no place in the model built from its config: {show_names(unexpected)}")
    return out


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
        raise ValueError(f"save_pretrained: {len(meta)} tensor(s) are on the meta device (never loaded): {show_names(meta)}")
    write_checkpoint(folder, model.config.to_dict(), state, max_shard_size)
