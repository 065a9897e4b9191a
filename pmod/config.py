"""The one model configuration object, validated at construction.

`PmodConfig` holds three parts: the decoder (`TextConfig`), the vision tower (`VisionConfig`) and
the routing (`ModConfig`), plus the multimodal glue (projector, image layout). Legacy checkpoint
formats (the official `pmod_llava_llama` strings, llava-hf) are translated into it in exactly one
place, `pmod.io.legacy`; everything else reads these typed fields.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from pmod.config_checks import _check, _check_ints, _check_reals, _is_int, from_fields
from pmod.config_parts import NATIVE_BACKENDS, TextConfig, VisionConfig
from pmod.schedule import SCHEDULES, prd_schedule

__all__ = ["TextConfig", "VisionConfig", "ModConfig", "PmodConfig", "CONFIG_NAME", "MODEL_TYPE"]

CONFIG_NAME = "config.json"
MODEL_TYPE = "pmod"
ROUTER_NORMS = ("tanh", "sigmoid", "softmax", "none")
PROJECTORS = ("mlp2x_gelu", "linear", "none")  # none: the tower projects itself (Qwen2.5-VL's patch merger)


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
    string: bool = True  # STRing: scale by w (PMOD_SPEC §4.5); False, an ablation, only routes (the router gets no gradient)

    def __post_init__(self) -> None:
        _check(self.schedule in SCHEDULES, f"ModConfig: schedule={self.schedule!r}; expected one of {SCHEDULES}")
        _check(self.norm in ROUTER_NORMS, f"ModConfig: norm={self.norm!r}; expected one of {ROUTER_NORMS}")
        _check_reals("ModConfig", self, ("avg_ratio", "max_ratio", "min_ratio", "norm_scale", "norm_bias", "router_init_std"))
        _check(self.router_init_std >= 0, f"ModConfig: router_init_std must be >= 0, got {self.router_init_std}")
        _check(isinstance(self.router_bias, bool), f"ModConfig: router_bias must be true or false, got {self.router_bias!r}")
        _check(isinstance(self.string, bool), f"ModConfig: string must be true or false, got {self.string!r}")
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
            self.text = from_fields(TextConfig, self.text, "PmodConfig", "text")
        if isinstance(self.vision, dict):
            self.vision = from_fields(VisionConfig, self.vision, "PmodConfig", "vision")
        if isinstance(self.mod, dict):
            self.mod = from_fields(ModConfig, self.mod, "PmodConfig", "mod")
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
        _check(isinstance(d, dict), f"PmodConfig.from_dict: expected a mapping of fields, got {type(d).__name__}")
        if d.get("model_type", MODEL_TYPE) != MODEL_TYPE:
            raise ValueError(f"PmodConfig.from_dict: model_type={d.get('model_type')!r}, expected {MODEL_TYPE!r}")
        return from_fields(cls, dict(d), "PmodConfig.from_dict")

    @classmethod
    def from_name(cls, name: str, **changes: Any) -> "PmodConfig":
        """A named preset (`pmod.presets.PRESETS`: llava-1.5-7b, llava-1.5-13b, llava-next-7b, synth-compare) with
        the paper's p-MoD schedule unless `mod=` says otherwise. `changes` override fields; a dict for `text`,
        `vision` or `mod` updates the preset's fields rather than replacing them all."""
        from pmod.presets import PRESETS

        if name not in PRESETS:
            raise ValueError(f"PmodConfig.from_name: unknown preset {name!r}; known: {sorted(PRESETS)}")
        d = copy.deepcopy(PRESETS[name])
        for k, v in changes.items():
            v = _as_dict(v)
            d[k] = {**d[k], **v} if isinstance(v, dict) and isinstance(d.get(k), dict) else v
        return cls.from_dict(d)

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
