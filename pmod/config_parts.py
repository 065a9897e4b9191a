"""The decoder (`TextConfig`) and vision-tower (`VisionConfig`) parts of `pmod.config.PmodConfig`, each validated
at construction with errors that name the bad field and value."""
from __future__ import annotations

from dataclasses import dataclass, field

from pmod.config_checks import _check, _check_ints, _check_reals, _is_int, _is_real

__all__ = ["TextConfig", "VisionConfig", "VISION_BACKENDS", "NATIVE_BACKENDS"]

VISION_BACKENDS = ("clip", "siglip", "timm", "qwen2_5_vl", "qwen3_vl")
NATIVE_BACKENDS = ("qwen2_5_vl", "qwen3_vl")  # towers that take native-resolution patches and end in the decoder's width


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
    timm_width: int | None = None  # the backbone's num_features, declared: reading a width never builds a network
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
            width = self.timm_kwargs.get("embed_dim", self.timm_width)
            _check(_is_int(width) and width >= 1,
                   f"VisionConfig: backend='timm' needs the feature width as timm_width (or timm_kwargs['embed_dim']), "
                   f"got {width!r}; e.g. 192 for vit_tiny_patch16_224")
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
        return int(self.timm_kwargs.get("embed_dim", self.timm_width))

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
