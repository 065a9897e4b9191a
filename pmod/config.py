"""The one model configuration object, validated at construction.

`PmodConfig` holds three parts: the decoder (`TextConfig`), the vision tower (`VisionConfig`) and
the routing (`ModConfig`), plus the multimodal glue (projector, image layout). Legacy checkpoint
formats (the official `pmod_llava_llama` strings, llava-hf) are translated into it in exactly one
place, `pmod.io.legacy`; everything else reads these typed fields.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from pmod.schedule import SCHEDULES, prd_schedule

__all__ = ["TextConfig", "VisionConfig", "ModConfig", "PmodConfig", "CONFIG_NAME", "MODEL_TYPE"]

CONFIG_NAME = "config.json"
MODEL_TYPE = "pmod"
ROUTER_NORMS = ("tanh", "sigmoid", "softmax", "none")
PROJECTORS = ("mlp2x_gelu", "linear")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


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

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            _check(
                self.hidden_size % self.num_attention_heads == 0,
                f"TextConfig: hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                f"{self.num_attention_heads}; set head_dim explicitly",
            )
            self.head_dim = self.hidden_size // self.num_attention_heads
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            _check(getattr(self, name) > 0, f"TextConfig: {name} must be positive, got {getattr(self, name)}")
        _check(
            self.num_attention_heads % self.num_key_value_heads == 0,
            f"TextConfig: num_attention_heads={self.num_attention_heads} must be a multiple of "
            f"num_key_value_heads={self.num_key_value_heads}",
        )
        _check(self.hidden_act == "silu", f"TextConfig: hidden_act={self.hidden_act!r} unsupported (SwiGLU needs 'silu')")
        if self.rope_scaling is not None:
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
    (CLIPVisionConfig fields); `backend='timm'` builds `timm_model` (no pretrained download).
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

    def __post_init__(self) -> None:
        _check(self.backend in ("clip", "timm"), f"VisionConfig: backend={self.backend!r}; expected 'clip' or 'timm'")
        _check(
            self.select_feature in ("patch", "cls_patch"),
            f"VisionConfig: select_feature={self.select_feature!r}; expected 'patch' or 'cls_patch'",
        )
        if self.backend == "timm":
            _check(bool(self.timm_model), "VisionConfig: backend='timm' needs timm_model")
        self.image_mean = tuple(self.image_mean)
        self.image_std = tuple(self.image_std)

    @property
    def hidden_size(self) -> int:
        if self.backend == "clip":
            return int(self.clip.get("hidden_size", 768))  # CLIPVisionConfig defaults
        return int(self.timm_kwargs["embed_dim"]) if "embed_dim" in self.timm_kwargs else _timm_width(self.timm_model)

    @property
    def image_size(self) -> int:
        if self.backend == "clip":
            return int(self.clip.get("image_size", 224))
        return int(self.timm_kwargs.get("img_size", 224))

    @property
    def patch_size(self) -> int:
        if self.backend == "clip":
            return int(self.clip.get("patch_size", 32))
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
        if self.layer_ratios is not None:
            self.layer_ratios = {int(k): float(v) for k, v in self.layer_ratios.items()}
            for layer, ratio in self.layer_ratios.items():
                _check(0.0 < ratio <= 1.0, f"ModConfig: ratio {ratio} of layer {layer} is outside (0, 1]")
        elif self.schedule in ("shiftedcos", "shiftedlinear"):
            _check(
                0.0 < self.min_ratio <= self.max_ratio <= 1.0,
                f"ModConfig: need 0 < min_ratio <= max_ratio <= 1, got min_ratio={self.min_ratio}, "
                f"max_ratio={self.max_ratio}",
            )
        elif self.schedule != "none":
            _check(0.0 < self.avg_ratio <= 1.0, f"ModConfig: avg_ratio={self.avg_ratio} is outside (0, 1]")

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
    model_max_length: int = 2048
    padding_side: str = "right"
    conv_template: str = "vicuna_v1"
    model_type: str = MODEL_TYPE

    def __post_init__(self) -> None:
        if isinstance(self.text, dict):
            self.text = TextConfig(**self.text)
        if isinstance(self.vision, dict):
            self.vision = VisionConfig(**self.vision)
        if isinstance(self.mod, dict):
            self.mod = ModConfig(**self.mod)
        _check(self.projector_type in PROJECTORS, f"PmodConfig: projector_type={self.projector_type!r}; expected one of {PROJECTORS}")
        _check(
            self.image_aspect_ratio in ("pad", "anyres", "square"),
            f"PmodConfig: image_aspect_ratio={self.image_aspect_ratio!r}; expected 'pad', 'anyres' or 'square'",
        )
        _check(
            self.mm_patch_merge_type in ("flat", "spatial_unpad", "spatial"),
            f"PmodConfig: mm_patch_merge_type={self.mm_patch_merge_type!r}; expected 'flat', 'spatial' or 'spatial_unpad'",
        )
        if self.image_aspect_ratio == "anyres":
            _check(bool(self.image_grid_pinpoints), "PmodConfig: image_aspect_ratio='anyres' needs image_grid_pinpoints")
        _check(self.padding_side in ("left", "right"), f"PmodConfig: padding_side={self.padding_side!r}")
        _check(self.model_max_length > 0, f"PmodConfig: model_max_length must be positive, got {self.model_max_length}")
        self.mod_ratios  # validates layer indices against the depth

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
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, CONFIG_NAME), "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")

    def replace(self, **changes: Any) -> "PmodConfig":
        """A copy with top-level fields changed (`text=`, `mod=`, ... take dataclasses or dicts)."""
        return PmodConfig.from_dict({**self.to_dict(), **{k: _as_dict(v) for k, v in changes.items()}})


def _as_dict(v: Any) -> Any:
    return dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
