"""Hardening of checkpoint reading (issue 16): finite checks as weights are read, and errors that name the problem
in the checkpoint's own vocabulary (keys, files, dtypes, devices), a pickle in place of weights refused unrun."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import planted_pickle, tiny_model
from safetensors.torch import load_file, save_file

import pmod
from pmod.io import CheckpointError

# --- what is read, and the errors ---------------------------------------------------------------------------
def _saved(tmp_path, **kw) -> Path:
    tiny_model(**kw).save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_weight_is_named_when_read(tmp_path, bad):
    f = _saved(tmp_path) / "model.safetensors"
    sd = load_file(f)
    sd["language_model.layers.1.mlp.up_proj.weight"][3, 5] = bad
    save_file(sd, f)
    with pytest.raises(CheckpointError, match=r"language_model\.layers\.1\.mlp\.up_proj\.weight holds 1 non-finite.*\(3, 5\)"):
        pmod.from_pretrained(tmp_path)
    m = pmod.from_pretrained(tmp_path, check_finite=False)  # the opt-out for huge checkpoints
    assert not torch.isfinite(m.language_model.layers[1].mlp.up_proj.weight).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_the_finite_check_sees_every_position_and_never_overflows(dtype):
    from pmod.io.files import check_finite

    x = torch.full((1027,), 60000.0 if dtype == torch.float16 else 1e30, dtype=dtype)  # a sum would overflow
    check_finite("big", x, "here")
    for pos in (0, 1, 15, 16, 17, 511, 1025, 1026):  # vector starts, middles and tails
        for bad in (float("nan"), float("inf"), -float("inf")):
            y = torch.randn(1027).to(dtype)
            y[pos] = bad
            with pytest.raises(CheckpointError, match=rf"tensor w holds 1 non-finite value\(s\).*index \({pos},\)"):
                check_finite("w", y, "here")


def test_an_integer_tensor_in_a_checkpoint_is_named(tmp_path):
    f = _saved(tmp_path) / "model.safetensors"
    sd = load_file(f)
    sd["language_model.norm.weight"] = torch.ones(64, dtype=torch.int64)
    save_file(sd, f)
    with pytest.raises(CheckpointError, match=r"language_model\.norm\.weight: checkpoint dtype torch\.int64"):
        pmod.from_pretrained(tmp_path)


def test_missing_official_keys_are_named_as_in_the_checkpoint(tmp_path, official_dir):
    shutil.copytree(official_dir / "checkpoint", tmp_path / "ckpt")
    f = tmp_path / "ckpt" / "model.safetensors"
    sd = load_file(f)
    for k in ("model.layers.12.router.router.weight", "model.layers.12.decoder_layer.mlp.up_proj.weight",
              "model.layers.3.mlp.up_proj.weight"):
        sd.pop(k)
    save_file(sd, f)
    with pytest.raises(CheckpointError) as e:
        pmod.from_pretrained(tmp_path / "ckpt")
    msg = str(e.value)
    assert "3 parameter(s) missing" in msg
    for k in ("model.layers.12.router.router.weight", "model.layers.12.decoder_layer.mlp.up_proj.weight",
              "model.layers.3.mlp.up_proj.weight"):
        assert k in msg, (k, msg)
    assert "(pmod: language_model.routers.12.weight)" in msg


def test_unknown_key_is_a_checkpoint_error_naming_file_and_key(tmp_path, official_dir):
    shutil.copytree(official_dir / "checkpoint", tmp_path / "ckpt")
    f = tmp_path / "ckpt" / "model.safetensors"
    sd = load_file(f)
    sd["model.mystery.weight"] = torch.zeros(2)
    save_file(sd, f)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: official p-MoD checkpoint: 1 key\(s\).*model\.mystery\.weight"):
        pmod.from_pretrained(tmp_path / "ckpt")


def test_every_loading_problem_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        pmod.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError):  # still a FileNotFoundError for callers written that way
        pmod.from_pretrained(tmp_path / "nowhere")
    _saved(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 40)
    with pytest.raises(CheckpointError, match="model.safetensors: cannot read weights"):
        pmod.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="must hold a JSON object"):
        pmod.load_config(tmp_path)


def test_a_pickle_in_place_of_weights_is_refused_without_running(tmp_path):
    marker = tmp_path / "PWNED"
    planted_pickle(tmp_path / "pytorch_model.bin", marker)
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*(refused|cannot read)"):
        pmod.io.files.read_tensors(tmp_path / "pytorch_model.bin")
    assert not marker.exists()


def test_bad_dtype_and_unavailable_device_are_refused_before_loading(tmp_path):
    _saved(tmp_path)
    with pytest.raises(ValueError, match=r"dtype='bogus'.*bfloat16"):
        pmod.from_pretrained(tmp_path, dtype="bogus")
    with pytest.raises(ValueError, match=r"dtype=torch\.int64"):
        pmod.from_pretrained(tmp_path, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"device='cdua' is not a device name"):
        pmod.from_pretrained(tmp_path, device="cdua")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"device='cuda' but no CUDA GPU is available"):
            pmod.from_pretrained(tmp_path, device="cuda")
