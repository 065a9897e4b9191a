"""The one model configuration object, validated at construction.

`PmodConfig` holds three parts: the decoder (`TextConfig`), the vision tower (`VisionConfig`) and
the routing (`ModConfig`), plus the multimodal glue (projector, image layout). Legacy checkpoint
formats (the official `pmod_llava_llama` strings, llava-hf) are translated into it in exactly one
place, `pmod.io.legacy`; everything else reads these typed fields.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from pmod.schedule import SCHEDULES, prd_schedule

__all__ = ["TextConfig", "VisionConfig", "ModConfig", "PmodConfig", "CONFIG_NAME", "MODEL_TYPE"]

CONFIG_NAME = "config.json"
MODEL_TYPE = "pmod"
ROUTER_NORMS = ("tanh", "sigmoid", "softmax", "none")
PROJECTORS = ("mlp2x_gelu", "linear", "none")  # none: the tower projects itself (Qwen2.5-VL's patch merger)
VISION_BACKENDS = ("clip", "siglip", "timm", "qwen2_5_vl", "qwen3_vl")
NATIVE_BACKENDS = ("qwen2_5_vl", "qwen3_vl")  # towers that take native-resolution patches and end in the decoder's width


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _check_ints(owner: str, obj: Any, names: tuple[str, ...], minimum: int = 1, optional: bool = False) -> None:
    """Each field an int (not a bool, not a string) >= minimum; the message names the field and the value."""
    for name in names:
        v = getattr(obj, name)
        if v is None and optional:
            continue
        _check(_is_int(v), f"{owner}: {name} must be an integer, got {v!r} ({type(v).__name__})")
        _check(v >= minimum, f"{owner}: {name} must be >= {minimum}, got {v}")


def _check_reals(owner: str, obj: Any, names: tuple[str, ...], positive: bool = False) -> None:
    for name in names:
        v = getattr(obj, name)
        _check(_is_real(v), f"{owner}: {name} must be a finite number, got {v!r} ({type(v).__name__})")
        _check(not positive or v > 0, f"{owner}: {name} must be positive, got {v}")


def _from_fields(cls: type, d: Any, where: str) -> Any:
    """Build a config dataclass from a dict, naming unknown fields (instead of a TypeError from __init__)."""
    _check(isinstance(d, dict), f"PmodConfig: {where} must be a mapping of fields, got {type(d).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    _check(not unknown, f"PmodConfig: unknown field(s) {[f'{where}.{k}' for k in unknown]}; {cls.__name__} has {sorted(known)}")
    return cls(**d)


@dataclass
class TextConfig:
    """A LLaMA-family decoder: RMSNorm, RoPE, GQA, SwiGLU; `qkv_bias` gives Qwen2's projections."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 4096
    qkv_bias: bool = False  # Qwen2
    o_bias: bool = False  # LLaMA `attention_bias=True` sets both
    mlp_bias: bool = False
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = 0
    mrope_section: list[int] | None = None  # Qwen2-VL's M-RoPE: rotary pairs driven by the (t, h, w) positions
    mrope_interleaved: bool = False  # Qwen3-VL: the pairs' axes interleaved (t, h, w, t, h, w, ...), not in blocks
    qk_norm: bool = False  # Qwen3: RMSNorm over each head's query and key before RoPE

    def __post_init__(self) -> None:
        # types and ranges first, so that no arithmetic below meets a string, a zero or a negative size
        _check_ints("TextConfig", self, ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                         "num_attention_heads", "max_position_embeddings"))
        _check_ints("TextConfig", self, ("num_key_value_heads", "head_dim"), optional=True)
        _check_ints("TextConfig", self, ("bos_token_id", "pad_token_id"), minimum=-1, optional=True)  # -1: LLaMA-1's "none"
        eos = self.eos_token_id if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]
        _check(self.eos_token_id is None or all(_is_int(e) for e in eos),
               f"TextConfig: eos_token_id must be a token id or a list of them, got {self.eos_token_id!r}")
        _check_reals("TextConfig", self, ("rms_norm_eps", "rope_theta"), positive=True)
        for name in ("qkv_bias", "o_bias", "mlp_bias", "tie_word_embeddings", "mrope_interleaved", "qk_norm"):
            _check(isinstance(getattr(self, name), bool), f"TextConfig: {name} must be true or false, got {getattr(self, name)!r}")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            _check(
                self.hidden_size % self.num_attention_heads == 0,
                f"TextConfig: hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                f"{self.num_attention_heads}; set head_dim explicitly",
            )
            self.head_dim = self.hidden_size // self.num_attention_heads
        _check(
            self.num_attention_heads % self.num_key_value_heads == 0,
            f"TextConfig: num_attention_heads={self.num_attention_heads} must be a multiple of "
            f"num_key_value_heads={self.num_key_value_heads}",
        )
        _check(self.hidden_act == "silu", f"TextConfig: hidden_act={self.hidden_act!r} unsupported (SwiGLU needs 'silu')")
        if self.mrope_section is not None:
            sec = self.mrope_section
            _check(isinstance(sec, (list, tuple)) and len(sec) == 3 and all(_is_int(v) and v >= 0 for v in sec)
                   and sum(sec) == self.head_dim // 2,
                   f"TextConfig: mrope_section={sec!r} must be 3 non-negative integers summing to head_dim // 2 = {self.head_dim // 2}")
            self.mrope_section = [int(v) for v in sec]
        if self.rope_scaling is not None:
            _check(isinstance(self.rope_scaling, dict), f"TextConfig: rope_scaling must be a mapping or null, got {self.rope_scaling!r}")
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            _check(
                kind in ("default", "linear", "llama3"),
                f"TextConfig: rope_scaling type {kind!r} unsupported; expected 'linear' or 'llama3'",
            )

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]


@dataclass
class VisionConfig:
    """The image encoder. `backend='clip'` builds transformers' CLIPVisionModel from `clip`
    (CLIPVisionConfig fields), `backend='siglip'` its SiglipVisionModel from the same dict (SiglipVisionConfig
    fields; no CLS token); `backend='timm'` builds `timm_model` (no pretrained download).
    `name` is the tower's hub id or folder, kept for the image-processor settings."""

    backend: str = "clip"
    name: str | None = None
    clip: dict = field(default_factory=dict)
    timm_model: str | None = None
    timm_kwargs: dict = field(default_factory=dict)
    select_layer: int = -2
    select_feature: str = "patch"  # "patch" drops CLS, "cls_patch" keeps it
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    min_pixels: int | None = None  # qwen2_5_vl: the processor's dynamic-resolution bounds (smart_resize)
    max_pixels: int | None = None

    def __post_init__(self) -> None:
        _check(self.backend in VISION_BACKENDS, f"VisionConfig: backend={self.backend!r}; expected one of {VISION_BACKENDS}")
        _check(
            self.select_feature in ("patch", "cls_patch"),
            f"VisionConfig: select_feature={self.select_feature!r}; expected 'patch' or 'cls_patch'",
        )
        _check(not (self.backend == "siglip" and self.select_feature == "cls_patch"),
               "VisionConfig: a SigLIP tower has no CLS token; select_feature must be 'patch'")
        _check(_is_int(self.select_layer), f"VisionConfig: select_layer must be an integer, got {self.select_layer!r}")
        if self.backend == "timm":
            _check(bool(self.timm_model), "VisionConfig: backend='timm' needs timm_model")
        elif self.backend in NATIVE_BACKENDS:  # Qwen2_5_VL / Qwen3VL VisionConfig fields; transformers validates the rest
            _check(isinstance(self.clip, dict), f"VisionConfig: clip must be a mapping of tower config fields, got {self.clip!r}")
            for name in ("hidden_size", "out_hidden_size", "depth", "num_heads", "patch_size", "spatial_merge_size",
                         "temporal_patch_size", "in_channels"):
                v = self.clip.get(name, 1)
                _check(_is_int(v) and v >= 1, f"VisionConfig: {name} must be a positive integer, got {v!r}")
            _check_ints("VisionConfig", self, ("min_pixels", "max_pixels"), optional=True)
            _check(self.min_pixels is None or self.max_pixels is None or self.min_pixels <= self.max_pixels,
                   f"VisionConfig: min_pixels={self.min_pixels} exceeds max_pixels={self.max_pixels}")
        else:
            _check(isinstance(self.clip, dict), f"VisionConfig: clip must be a mapping of tower config fields, got {self.clip!r}")
            for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                         "patch_size", "num_channels"):
                v = self.clip.get(name, 1)
                _check(_is_int(v) and v >= 1, f"VisionConfig: {name} must be a positive integer, got {v!r}")
            heads = self.clip.get("num_attention_heads", 12)
            _check(self.hidden_size % heads == 0,
                   f"VisionConfig: hidden_size={self.hidden_size} is not divisible by num_attention_heads={heads}")
            _check(self.image_size >= self.patch_size,
                   f"VisionConfig: image_size={self.image_size} is smaller than patch_size={self.patch_size}")
            depth = self.clip.get("num_hidden_layers", 12)
            _check(-depth - 1 <= self.select_layer <= depth,
                   f"VisionConfig: select_layer={self.select_layer} is outside a {depth}-layer tower")
        for name in ("image_mean", "image_std"):
            v = tuple(getattr(self, name))
            _check(len(v) == 3 and all(_is_real(x) for x in v), f"VisionConfig: {name} must be 3 finite numbers, got {v!r}")
            setattr(self, name, v)
        _check(all(x > 0 for x in self.image_std), f"VisionConfig: image_std must be positive, got {self.image_std}")

    @property
    def hidden_size(self) -> int:
        if self.backend in NATIVE_BACKENDS:  # what the tower hands the decoder (after its merger)
            return int(self.clip["out_hidden_size"])
        if self.backend != "timm":
            return int(self.clip.get("hidden_size", 768))  # CLIPVisionConfig / SiglipVisionConfig defaults
        return int(self.timm_kwargs["embed_dim"]) if "embed_dim" in self.timm_kwargs else _timm_width(self.timm_model)

    @property
    def image_size(self) -> int:
        if self.backend != "timm":
            return int(self.clip.get("image_size", 224))
        return int(self.timm_kwargs.get("img_size", 224))

    @property
    def patch_size(self) -> int:
        if self.backend != "timm":
            return int(self.clip.get("patch_size", 32 if self.backend == "clip" else 16))
        return int(self.timm_kwargs.get("patch_size", 16))

    @property
    def num_patches(self) -> int:
        """Tokens per S x S image after feature selection."""
        side = self.image_size // self.patch_size
        return side * side + (1 if self.select_feature == "cls_patch" else 0)


def _timm_width(name: str) -> int:
    import timm

    return timm.create_model(name, pretrained=False, num_classes=0).num_features


@dataclass
class ModConfig:
    """Mixture-of-Depths routing of vision tokens.

    `schedule` picks the PRD curve (`shiftedcos` is the paper's); `avg_ratio`, `max_ratio`,
    `min_ratio` shape it (see `pmod.schedule.prd_schedule`). `layer_ratios` pins an explicit
    {layer: ratio} map instead. The router weight is w = norm_scale * f(r) + norm_bias with
    f = `norm` (TanhNorm: tanh, 0.2, 1).
    """

    schedule: str = "shiftedcos"
    avg_ratio: float = 0.5
    max_ratio: float = 0.85
    min_ratio: float = 0.15
    layer_ratios: dict[int, float] | None = None
    norm: str = "tanh"
    norm_scale: float = 0.2
    norm_bias: float = 1.0
    router_bias: bool = True
    router_init_std: float = 0.0  # 0 = zero init (the paper's `mod_special_init`)

    def __post_init__(self) -> None:
        _check(self.schedule in SCHEDULES, f"ModConfig: schedule={self.schedule!r}; expected one of {SCHEDULES}")
        _check(self.norm in ROUTER_NORMS, f"ModConfig: norm={self.norm!r}; expected one of {ROUTER_NORMS}")
        _check_reals("ModConfig", self, ("avg_ratio", "max_ratio", "min_ratio", "norm_scale", "norm_bias", "router_init_std"))
        _check(self.router_init_std >= 0, f"ModConfig: router_init_std must be >= 0, got {self.router_init_std}")
        _check(isinstance(self.router_bias, bool), f"ModConfig: router_bias must be true or false, got {self.router_bias!r}")
        if self.layer_ratios is not None:
            _check(isinstance(self.layer_ratios, dict), f"ModConfig: layer_ratios must map layer -> ratio, got {self.layer_ratios!r}")
            try:
                self.layer_ratios = {int(k): float(v) for k, v in self.layer_ratios.items()}
            except (TypeError, ValueError):
                raise ValueError(f"ModConfig: layer_ratios must map integer layers to ratios, got {self.layer_ratios!r}") from None
            for layer, ratio in self.layer_ratios.items():
                _check(0.0 < ratio <= 1.0, f"ModConfig: ratio {ratio} of layer {layer} is outside (0, 1]")
            return
        if self.schedule != "none":  # an average above 1 would keep every layer dense, silently
            _check(0.0 < self.avg_ratio <= 1.0, f"ModConfig: avg_ratio={self.avg_ratio} is outside (0, 1]")
        if self.schedule in ("shiftedcos", "shiftedlinear"):
            _check(
                0.0 < self.min_ratio <= self.max_ratio <= 1.0,
                f"ModConfig: need 0 < min_ratio <= max_ratio <= 1, got min_ratio={self.min_ratio}, "
                f"max_ratio={self.max_ratio}",
            )

    def ratios(self, num_layers: int) -> dict[int, float]:
        """{MoD layer index: keep ratio}, ascending by layer."""
        if self.layer_ratios is not None:
            bad = [i for i in self.layer_ratios if not 0 <= i < num_layers]
            _check(not bad, f"ModConfig: layer_ratios names layers {bad} outside 0..{num_layers - 1}")
            return dict(sorted(self.layer_ratios.items()))
        return prd_schedule(num_layers, self.schedule, self.avg_ratio, self.max_ratio, self.min_ratio)


@dataclass
class PmodConfig:
    """A LLaVA-style model: vision tower -> projector -> LLaMA-family decoder with MoD routers."""

    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    mod: ModConfig = field(default_factory=ModConfig)
    projector_type: str = "mlp2x_gelu"
    image_aspect_ratio: str = "pad"  # "pad" (LLaVA-1.5), "anyres" (LLaVA-NeXT), "square"
    mm_patch_merge_type: str = "flat"  # "flat" or "spatial_unpad" (adds image_newline)
    image_grid_pinpoints: list[list[int]] | None = None
    anyres_max_crops: int | None = None  # LLaVA-OneVision's anyres_max_N: shrink the unpadded map to ~N crops
    model_max_length: int = 2048
    padding_side: str = "right"
    conv_template: str = "vicuna_v1"
    model_type: str = MODEL_TYPE

    def __post_init__(self) -> None:
        if isinstance(self.text, dict):
            self.text = _from_fields(TextConfig, self.text, "text")
        if isinstance(self.vision, dict):
            self.vision = _from_fields(VisionConfig, self.vision, "vision")
        if isinstance(self.mod, dict):
            self.mod = _from_fields(ModConfig, self.mod, "mod")
        for name, cls in (("text", TextConfig), ("vision", VisionConfig), ("mod", ModConfig)):
            _check(isinstance(getattr(self, name), cls), f"PmodConfig: {name} must be a {cls.__name__} or a dict, "
                                                         f"got {type(getattr(self, name)).__name__}")
        _check(self.projector_type in PROJECTORS, f"PmodConfig: projector_type={self.projector_type!r}; expected one of {PROJECTORS}")
        _check(
            self.image_aspect_ratio in ("pad", "anyres", "square", "native"),
            f"PmodConfig: image_aspect_ratio={self.image_aspect_ratio!r}; expected 'pad', 'anyres', 'square' or 'native'",
        )
        _check(
            self.mm_patch_merge_type in ("flat", "spatial_unpad", "spatial"),
            f"PmodConfig: mm_patch_merge_type={self.mm_patch_merge_type!r}; expected 'flat', 'spatial' or 'spatial_unpad'",
        )
        if self.image_aspect_ratio == "anyres":
            _check(bool(self.image_grid_pinpoints), "PmodConfig: image_aspect_ratio='anyres' needs image_grid_pinpoints")
        native = self.vision.backend in NATIVE_BACKENDS
        _check(native == (self.image_aspect_ratio == "native") and native == (self.projector_type == "none"),
               f"PmodConfig: the qwen2_5_vl tower goes with image_aspect_ratio='native' and projector_type='none' (and only "
               f"it), got backend={self.vision.backend!r}, {self.image_aspect_ratio!r}, {self.projector_type!r}")
        if self.anyres_max_crops is not None:
            _check(_is_int(self.anyres_max_crops) and self.anyres_max_crops >= 1,
                   f"PmodConfig: anyres_max_crops must be a positive integer or null, got {self.anyres_max_crops!r}")
            _check(self.uses_image_newline, "PmodConfig: anyres_max_crops (LLaVA-OneVision) needs image_aspect_ratio='anyres' "
                                            f"and mm_patch_merge_type='spatial_unpad', got {self.image_aspect_ratio!r}, "
                                            f"{self.mm_patch_merge_type!r}")
        _check(self.padding_side in ("left", "right"), f"PmodConfig: padding_side={self.padding_side!r}")
        _check_ints("PmodConfig", self, ("model_max_length",))
        if self.image_grid_pinpoints is not None:
            ok = isinstance(self.image_grid_pinpoints, (list, tuple)) and all(
                isinstance(p, (list, tuple)) and len(p) == 2 and all(_is_int(v) and v > 0 for v in p) for p in self.image_grid_pinpoints)
            _check(ok, f"PmodConfig: image_grid_pinpoints must be a list of [width, height] positive integers, "
                       f"got {self.image_grid_pinpoints!r}")
        ratios = self.mod_ratios  # validates layer indices against the depth
        _check(bool(ratios) or self.mod.schedule == "none",
               f"PmodConfig: the MoD schedule {self.mod.schedule!r} (avg_ratio={self.mod.avg_ratio}, max_ratio="
               f"{self.mod.max_ratio}) gives no MoD layer in a {self.text.num_hidden_layers}-layer decoder; "
               f"use schedule='none' for a dense model")

    @property
    def mod_ratios(self) -> dict[int, float]:
        return self.mod.ratios(self.text.num_hidden_layers)

    @property
    def is_dense(self) -> bool:
        return not self.mod_ratios

    @property
    def uses_image_newline(self) -> bool:
        return self.mm_patch_merge_type == "spatial_unpad" and self.image_aspect_ratio == "anyres"

    # --- serialisation --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["mod"]["layer_ratios"] is not None:
            d["mod"]["layer_ratios"] = {str(k): v for k, v in d["mod"]["layer_ratios"].items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PmodConfig":
        d = dict(d)
        if d.get("model_type", MODEL_TYPE) != MODEL_TYPE:
            raise ValueError(f"PmodConfig.from_dict: model_type={d.get('model_type')!r}, expected {MODEL_TYPE!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"PmodConfig.from_dict: unknown fields {unknown}")
        return cls(**d)

    def save(self, folder: str | os.PathLike) -> None:
        """config.json, written atomically (temp file, fsync, rename): never left empty by a crash."""
        from pmod.io.atomic import atomic_write_text, check_writable_dir

        check_writable_dir(folder, "config folder").mkdir(parents=True, exist_ok=True)
        atomic_write_text(os.path.join(folder, CONFIG_NAME), json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    def replace(self, **changes: Any) -> "PmodConfig":
        """A copy with top-level fields changed (`text=`, `mod=`, ... take dataclasses or dicts)."""
        return PmodConfig.from_dict({**self.to_dict(), **{k: _as_dict(v) for k, v in changes.items()}})


def _as_dict(v: Any) -> Any:
    return dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
