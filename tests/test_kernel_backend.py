"""The model's `kernel_backend` setting: the real tiny model, forward and backward, with the Triton MoD kernels
(interpreted on the CPU: TRITON_INTERPRET=1, in a subprocess so the setting never leaks) against the PyTorch path."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None


def _loss_and_grads(kernels: str):
    from conftest import make_batch, tiny_model

    model = tiny_model(layers=6).train()
    model.kernel_backend = kernels
    ids, mask, n = make_batch([(3, 1, 5), (2, 1, 6)])
    labels = ids.masked_fill(mask == 0, -100).masked_fill(ids < 0, -100)
    out = model(input_ids=ids, images=torch.randn(n, 3, 42, 42, generator=torch.Generator().manual_seed(1)),
                attention_mask=mask, labels=labels)
    out.loss.backward()
    return out.loss.detach(), {k: p.grad for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.skipif(not INTERPRETED, reason="run by test_triton_model_in_interpreter in a TRITON_INTERPRET=1 process")
def test_triton_kernels_match_torch_path():
    loss_t, grads_t = _loss_and_grads("torch")
    loss_k, grads_k = _loss_and_grads("triton")
    assert torch.allclose(loss_k, loss_t, rtol=1e-5, atol=1e-6), (loss_k, loss_t)
    assert grads_k.keys() == grads_t.keys()
    routers = [k for k in grads_t if k.startswith("language_model.routers.")]
    assert routers and all(grads_t[k].abs().sum() > 0 for k in routers)
    for k in grads_t:
        assert torch.allclose(grads_k[k], grads_t[k], rtol=1e-4, atol=1e-6), k


@pytest.mark.slow  # ~30 s: the interpreter runs every kernel in Python
@pytest.mark.skipif(INTERPRETED or not HAS_TRITON, reason="triton is not installed" if not HAS_TRITON else "in-process")
def test_triton_model_in_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "test_triton_kernels_match"]
    proc = subprocess.run(cmd, env=env, cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and " passed" in proc.stdout, f"{proc.stdout[-6000:]}\n{proc.stderr[-2000:]}"


def test_kernel_backend_setting_is_checked():
    from conftest import tiny_model

    model = tiny_model(layers=2)
    assert model.kernel_backend == "auto"
    model.kernel_backend = "torch"
    assert model.language_model.kernel_backend == "torch"
    with pytest.raises(ValueError, match="kernel_backend='cuda'"):
        model.kernel_backend = "cuda"
