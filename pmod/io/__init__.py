"""Checkpoints: layout detection and configs (`layouts`, `legacy`), key maps, weight files, loading and saving.

Supported layouts (detected from `config.json`):
- ours (`model_type: pmod`), written by `save_pretrained`;
- official p-MoD (`model_type: pmod_llava_llama`);
- original LLaVA-1.5 / LLaVA-NeXT (`llava_llama`, `llava_mistral`, `llava_qwen`), dense;
- transformers llava-hf (`llava`, `llava_next`), dense;
- transformers LLaVA-OneVision (`llava_onevision`), Qwen2.5-VL and Qwen3-VL (`qwen2_5_vl`, `qwen3_vl`), dense (`pmod.io.hf_vlm`).
A dense checkpoint becomes a p-MoD model with `mod=ModConfig(...)` (routers inserted, zero init).

pmod.io builds no model: `load_checkpoint(path, build)` takes the constructor; `pmod.from_pretrained` (in
`pmod.modeling.llava`) passes the model class. Nothing here imports `pmod.modeling`.
"""
from __future__ import annotations

from pmod.io.errors import CheckpointError, CheckpointNotFoundError
from pmod.io.layouts import clip_vision_config, detect_layout, load_config
from pmod.io.legacy import CLIP_VISION_FIELDS
from pmod.io.loader import load_checkpoint, read_mapped, resolve_device, resolve_dtype, save_pretrained

__all__ = ["load_checkpoint", "save_pretrained", "load_config", "detect_layout", "read_mapped", "clip_vision_config",
           "resolve_device", "resolve_dtype", "CLIP_VISION_FIELDS", "CheckpointError", "CheckpointNotFoundError"]
