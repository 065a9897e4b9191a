"""pmod_kernels is one module however it is imported: the repository root exposes the folder as `kernels` too, and
transformers imports `kernels` to probe for Hugging Face's kernel hub. A second copy re-registered pmod::route and
pmod::string_merge, which destroyed the registration the first copy's operators still called through (the
intermittent std::bad_alloc / vector::reserve of kernels/ops.py). Run in a fresh process: the probe is cached."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PROBE = r"""
import importlib, sys
import torch
import pmod_kernels
from torch._library.custom_ops import OPDEFS
first = (OPDEFS["pmod::route"], OPDEFS["pmod::string_merge"])
assert first == (pmod_kernels.ops.route, pmod_kernels.ops.string_merge_op)
from transformers.utils.import_utils import is_kernels_available
assert not is_kernels_available()  # probed: imported `kernels`, found no version
assert "kernels" in sys.modules, "the probe did not import kernels; this test no longer tests the alias"
assert sys.modules["kernels"] is pmod_kernels and importlib.import_module("kernels.ops") is pmod_kernels.ops
assert (OPDEFS["pmod::route"], OPDEFS["pmod::string_merge"]) == first, "pmod:: ops were registered twice"
x, w, idx = torch.randn(6, 4), torch.rand(6), torch.tensor([0, 4])
h, m = torch.randn(2, 4), torch.randn(2, 4)
out = torch.ops.pmod.string_merge(x, w, idx, h, m, "torch")
assert torch.equal(out, pmod_kernels.reference.string_merge(x, w, idx, h, m))
print("one copy")
"""


def test_kernels_under_its_folder_name_is_pmod_kernels():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "one copy" in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]


def test_fused_ops_are_the_default():
    import pmod_kernels

    assert pmod_kernels.ops.FUSED == (os.environ.get("PMOD_FUSED_OPS", "1") != "0")
    if pmod_kernels.ops.FUSED:
        assert pmod_kernels.route is pmod_kernels.ops.route
        assert pmod_kernels.string_merge_op is pmod_kernels.ops.string_merge_op
