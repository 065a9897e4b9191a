"""Benchmark shapes: the presets and their p-MoD variants."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from pmod.config import ModConfig, PmodConfig, TextConfig, VisionConfig

STAND_IN_CLIP = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                     image_size=336, patch_size=14, hidden_act="quick_gelu")


# ---------------------------------------------------------------------------------------------- presets
@dataclass(frozen=True)
class Preset:
    """Shapes and repetitions of one benchmark run. `images`: images per prompt (x P vision tokens each)."""

    name: str
    text: dict
    dtype: torch.dtype
    clip: dict = field(default_factory=lambda: dict(STAND_IN_CLIP))
    n_text: int = 58
    images: tuple[int, ...] = (1, 5)  # 576 (LLaVA-1.5) and 2880 (LLaVA-NeXT) vision tokens at P = 576
    sweep: tuple[float, ...] = (0.25, 0.5, 0.75)  # deep_all constant ratios, besides the default PRD
    sweep_images: tuple[int, ...] = (1, 5)  # prompts at which the sweep runs (PRD runs at all)
    decode_batches: tuple[int, ...] = (1, 8)
    decode_steps: int = 16
    hf_new_tokens: int = 33
    batch_prompts: int = 8
    batch_text: tuple[int, int] = (20, 69)  # shortest and longest prompt of the batching test
    batch_new_tokens: int = 16
    packed_images: tuple[int, ...] = (0, 1, 2)
    hf_images: tuple[int, ...] | None = None  # prompt sizes of the LlamaModel prefill comparison (default: images)
    router_std: float = 0.02
    warmup: int = 1
    reps: int = 3
    quick: dict = field(default_factory=dict)  # overrides applied by --quick

    def config(self, mod: ModConfig | None = None) -> PmodConfig:
        """The model config: our decoder shape, the CLIP stand-in, `mod` (default: dense)."""
        return PmodConfig(text=TextConfig(**self.text), vision=VisionConfig(clip=dict(self.clip)),
                          mod=mod or ModConfig(schedule="none"), model_max_length=self.text["max_position_embeddings"])


def _decoder_shape(name: str) -> dict:
    """The decoder shape of a named model (`PmodConfig.from_name`, the one place released shapes are written)."""
    t = PmodConfig.from_name(name).text
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "rms_norm_eps", "max_position_embeddings")
    return {k: getattr(t, k) for k in keys}


_VICUNA_7B = _decoder_shape("llava-1.5-7b")
PRESETS: dict[str, Preset] = {
    "cpu": Preset(  # Vicuna-7B's depth, vocabulary and context at a width a CPU runs in minutes
        "cpu", dict(_VICUNA_7B, hidden_size=512, intermediate_size=1376, num_attention_heads=8), torch.float32,
        warmup=1, reps=5,  # a shared 2-vCPU VM drifts by ~5 % between runs: 5 interleaved rounds, medians
        # --quick: <= 4 min on a 2-core machine (BENCHMARKS.md); the 2880-token prompt in prefill and decode only
        quick=dict(reps=2, sweep=(0.25,), sweep_images=(1,), decode_steps=4, hf_new_tokens=9, batch_new_tokens=4,
                   hf_images=(1,), packed_images=(0, 1)),
    ),
    "gpu-7b": Preset(
        "gpu-7b", dict(_VICUNA_7B), torch.bfloat16,
        decode_steps=64, hf_new_tokens=65, batch_new_tokens=32, warmup=2, reps=5,
        quick=dict(reps=3, sweep=(0.25,), decode_steps=16, hf_new_tokens=17, batch_new_tokens=16),
    ),
    "tiny": Preset(  # the smoke test's shape: seconds, bookkeeping only
        "tiny", dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=512), torch.float32,
        clip=dict(STAND_IN_CLIP, image_size=42), n_text=10, images=(1, 3), sweep=(0.5,), sweep_images=(1,),
        decode_batches=(1, 3), decode_steps=3, hf_new_tokens=4, batch_prompts=3, batch_text=(4, 9),
        batch_new_tokens=3, packed_images=(0, 1, 2), router_std=0.5, warmup=0, reps=1,
    ),
}


def schedules(preset: Preset) -> dict[str, ModConfig]:
    """The p-MoD variants: the default PRD (shifted cosine) and `deep_all` at each constant sweep ratio."""
    out = {"prd": ModConfig()}
    out.update({f"deep_all@{r:g}": ModConfig(schedule="deep_all", avg_ratio=r) for r in preset.sweep})
    return out


def resolve_preset(name: str, quick: bool = False, **overrides) -> Preset:
    """A preset by name, with its --quick overrides and explicit ones (None values ignored)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    p = PRESETS[name]
    changes = {**(p.quick if quick else {}), **{k: v for k, v in overrides.items() if v is not None}}
    return dataclasses.replace(p, **changes)
