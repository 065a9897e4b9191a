"""Checkpoint loading and saving: round trips, shards, dtype, and loud failures."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import make_batch, tiny_model
from safetensors.torch import load_file, save_file

import pmod
from pmod.io import CheckpointError


def _outputs(model, seed=0):
    ids, mask, n = make_batch([(3, 1, 4), (2, 1, 2)], seed=seed)
    pix = torch.randn(n, 3, 42, 42, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids, images=pix, attention_mask=mask).logits


@pytest.mark.parametrize("shard", ["5GB", "200KB"])
def test_save_load_roundtrip_identical(tmp_path, shard):
    model = tiny_model(layers=5)
    model.save_pretrained(tmp_path, max_shard_size=shard)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert ("model.safetensors.index.json" in files) == (shard == "200KB")
    again = pmod.from_pretrained(tmp_path)
    assert again.config == model.config
    assert torch.equal(_outputs(model), _outputs(again))


def test_dtype_and_meta_free_load(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    m = pmod.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in m.parameters()) and not any(b.is_meta for b in m.buffers())
    assert _outputs(m).dtype == torch.float32  # logits are returned in float32


def test_official_checkpoint_saved_as_ours_roundtrips(tmp_path, official_dir):
    m = pmod.from_pretrained(official_dir / "checkpoint")
    m.save_pretrained(tmp_path)
    again = pmod.from_pretrained(tmp_path)
    assert again.config.mod_ratios == m.config.mod_ratios
    ids = torch.tensor([[1, 5, 7, pmod.IMAGE_TOKEN_INDEX, 9, 11]])
    pix = torch.randn(1, 3, 70, 70)
    with torch.no_grad():
        assert torch.equal(m(input_ids=ids, images=pix).logits, again(input_ids=ids, images=pix).logits)


def test_missing_weights_file(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weight files"):
        pmod.from_pretrained(tmp_path)


def test_corrupt_weights_file_names_the_file(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])  # truncated
    with pytest.raises(ValueError, match=r"model\.safetensors: cannot read weights"):
        pmod.from_pretrained(tmp_path)


def test_missing_shard(tmp_path):
    tiny_model().save_pretrained(tmp_path, max_shard_size="200KB")
    next(tmp_path.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        pmod.from_pretrained(tmp_path)


def test_config_weights_mismatch_names_keys(tmp_path):
    tiny_model(layers=4).save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    sd.pop("language_model.layers.2.mlp.up_proj.weight")
    sd["language_model.layers.9.mlp.up_proj.weight"] = torch.zeros(96, 64)
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"language_model\.layers\.9\.mlp\.up_proj\.weight"):
        pmod.from_pretrained(tmp_path)
    sd.pop("language_model.layers.9.mlp.up_proj.weight")
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing.*language_model\.layers\.2\.mlp\.up_proj\.weight"):
        pmod.from_pretrained(tmp_path)


def test_shape_mismatch_names_key(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["text"]["intermediate_size"] = 128
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"mlp\.gate_proj\.weight: checkpoint \(96, 64\) vs model \(128, 64\)"):
        pmod.from_pretrained(tmp_path)


def test_official_layout_unknown_key_is_an_error(tmp_path, official_dir):
    shutil.copytree(official_dir / "checkpoint", tmp_path / "ckpt")
    sd = load_file(tmp_path / "ckpt" / "model.safetensors")
    sd["model.mystery.weight"] = torch.zeros(2)
    save_file(sd, tmp_path / "ckpt" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.mystery\.weight"):
        pmod.from_pretrained(tmp_path / "ckpt")


def test_unknown_layout_and_bad_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match="unknown checkpoint layout.*'bert'"):
        pmod.load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        pmod.load_config(tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        pmod.load_config(tmp_path / "nowhere")


def test_load_config_official_without_weights(official_dir):
    cfg = pmod.load_config(official_dir / "checkpoint")
    assert cfg.vision.num_patches == 25 and cfg.text.vocab_size == 320


def test_hub_id_loads_offline_from_the_local_cache(tmp_path, monkeypatch, official_dir):
    """A hub id resolves through the Hugging Face cache layout with HF_HUB_OFFLINE=1 (no network)."""
    cache = tmp_path / "hub"
    rev = "0" * 40
    snap = cache / "models--MCG-NJU--p-MoD-tiny" / "snapshots" / rev
    shutil.copytree(official_dir / "checkpoint", snap)
    (cache / "models--MCG-NJU--p-MoD-tiny" / "refs").mkdir()
    (cache / "models--MCG-NJU--p-MoD-tiny" / "refs" / "main").write_text(rev)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    model = pmod.from_pretrained("MCG-NJU/p-MoD-tiny")
    assert sorted(model.config.mod_ratios) == list(range(8, 32))
    with pytest.raises(FileNotFoundError, match="not available from the Hugging Face cache"):
        pmod.from_pretrained("MCG-NJU/not-cached")
