"""Name -> backend table, and the automatic choice (flash on CUDA when installed, else SDPA)."""
from __future__ import annotations

import contextlib
import importlib.util
from dataclasses import dataclass
from typing import Callable

import torch

from pmod.attention import eager, sdpa

__all__ = ["AttentionBackend", "BACKENDS", "available_backends", "resolve_backend", "flash_attn_available",
           "write_through"]


@dataclass(frozen=True)
class AttentionBackend:
    """prefill(q, k, v, varlen, scale) over packed [N, *, D]; decode(q [B, H, D], k_cache, v_cache, seqlens [B],
    scale, uniform) over a PmodCache layer stored heads first ([B, G, S, D]) or not ([B, S, G, D])."""

    name: str
    prefill: Callable
    decode: Callable
    heads_first_cache: bool = False
    scope: Callable[[torch.device | str], contextlib.AbstractContextManager] = lambda device: contextlib.nullcontext()
    """scope(device): a context the model enters once per forward / decode step (kernel choices of the backend)."""
    decode_step: Callable | None = None
    """decode_step(q [B, H, D], k_new, v_new [B, G, D], cache, layer, scale) -> [B, H, D]: writes the new token into
    the PmodCache layer and attends, the one entry a decode step calls. Default: `write_through(decode)`."""

    def __post_init__(self):
        if self.decode_step is None:
            object.__setattr__(self, "decode_step", write_through(self.decode))


def write_through(decode: Callable) -> Callable:
    """A decode_step for kernels that read a cache already written (SDPA, eager): PmodCache.append, then decode."""

    def decode_step(q, k_new, v_new, cache, layer: int, scale: float):
        k_cache, v_cache, seqlens, uniform = cache.append(layer, k_new, v_new)
        return decode(q, k_cache, v_cache, seqlens, scale, uniform)

    return decode_step


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()


def _flash() -> AttentionBackend:
    from pmod.attention import flash

    return AttentionBackend("flash", flash.prefill, flash.decode, decode_step=flash.decode_step)  # the kernel inserts k, v


BACKENDS: dict[str, Callable[[], AttentionBackend]] = {
    "eager": lambda: AttentionBackend("eager", eager.prefill, eager.decode),
    "sdpa": lambda: AttentionBackend("sdpa", sdpa.prefill, sdpa.decode, heads_first_cache=True,
                                     scope=sdpa.kernel_scope),
    "flash": _flash,
}


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    names = ["eager", "sdpa"]
    if flash_attn_available() and torch.device(device).type == "cuda":
        names.append("flash")
    return names


def resolve_backend(name: str | None, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> AttentionBackend:
    """'auto' (or None) picks flash on CUDA for fp16/bf16 when flash-attn is installed, SDPA otherwise."""
    name = name or "auto"
    if name == "auto":
        half = dtype in (None, torch.float16, torch.bfloat16)  # flash-attn takes half precision only
        name = "flash" if half and "flash" in available_backends(device) else "sdpa"
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; expected 'auto' or one of {sorted(BACKENDS)}")
    if name == "flash" and not flash_attn_available():
        raise RuntimeError("attention backend 'flash' needs the flash-attn package and a CUDA device; "
                           "install pmod[flash] on a GPU machine or use attn_backend='sdpa'")
    return BACKENDS[name]()
