"""What a new sequence length costs each SDPA kernel choice on CUDA (why `pmod.attention.sdpa.kernel_scope` exists).

    python eval/sdpa_shape_cost.py        # a CUDA device; ~10 s

Decode-like calls (q of one token, 32 heads x 128, bf16) over 48 consecutive cache lengths, first while each
length is new, then again; then causal prefill-like calls over 24 new lengths. cuDNN attention builds an
execution plan per new shape, which is what a MoD decoder meets in every layer of every decode step.
"""
from __future__ import annotations

import contextlib
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

NON_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
CHOICES = {"default": contextlib.nullcontext, "flash+eff+math": lambda: sdpa_kernel(NON_CUDNN),
           "cudnn only": lambda: sdpa_kernel([SDPBackend.CUDNN_ATTENTION])}


def _ms_per_call(fn, lengths) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    for n in lengths:
        fn(n)
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / len(lengths) * 1e3


def main() -> None:
    dev, dt = "cuda", torch.bfloat16
    print("device", torch.cuda.get_device_name(), "| torch", torch.__version__, "| cudnn sdp enabled",
          torch.backends.cuda.cudnn_sdp_enabled())
    q = torch.randn(1, 32, 1, 128, device=dev, dtype=dt)
    kv = torch.randn(1, 32, 4096, 128, device=dev, dtype=dt)
    for i, (name, scope) in enumerate(CHOICES.items()):
        def decode(n, scope=scope):
            with scope():
                F.scaled_dot_product_attention(q, kv[:, :, :n], kv[:, :, :n])
        lengths = range(600 + 100 * i, 648 + 100 * i)
        new, seen = _ms_per_call(decode, lengths), _ms_per_call(decode, lengths)
        print(f"decode  {name:15s} new lengths {new:8.3f} ms/call   repeated lengths {seen:7.3f} ms/call")
    for i, name in enumerate(("default", "flash+eff+math")):
        def causal(n, scope=CHOICES[name]):
            with scope():
                F.scaled_dot_product_attention(kv[:, :, :n], kv[:, :, :n], kv[:, :, :n], is_causal=True)
        print(f"prefill {name:15s} new lengths {_ms_per_call(causal, range(300 + 100 * i, 324 + 100 * i)):8.3f} ms/call")


if __name__ == "__main__":
    main()
