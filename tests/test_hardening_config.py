"""Hardening of configs (issue 16): every bad config.json field is a CheckpointError naming the file, the field
and the value (never a ZeroDivisionError or a TypeError from deep inside); ModConfig refuses values that would
silently give a dense model; the well-known vision towers have built-in configs, so `pmod.load_config` and
`pmod flops` work on a released config.json alone, offline."""
from __future__ import annotations

import json
import shutil

import pytest

import pmod
from pmod.config import ModConfig, TextConfig, VisionConfig
from pmod.io import CheckpointError


def _ours(tmp_path, edit) -> object:
    from conftest import tiny_config

    d = tiny_config().to_dict()
    edit(d)
    (tmp_path / "config.json").write_text(json.dumps(d))
    return tmp_path


@pytest.mark.parametrize("edit,msg", [
    (lambda d: d["text"].update(num_key_value_heads=0), r"num_key_value_heads must be >= 1, got 0"),
    (lambda d: d["text"].update(num_attention_heads=0), r"num_attention_heads must be >= 1, got 0"),
    (lambda d: d["text"].update(num_attention_heads=5, num_key_value_heads=5, head_dim=None), r"hidden_size=64 is not divisible by num_attention_heads=5"),
    (lambda d: d["text"].update(num_key_value_heads=3), r"num_attention_heads=4 must be a multiple of num_key_value_heads=3"),
    (lambda d: d["text"].update(intermediate_size=-96), r"intermediate_size must be >= 1, got -96"),
    (lambda d: d["text"].update(hidden_size=-64), r"hidden_size must be >= 1, got -64"),
    (lambda d: d["text"].update(num_hidden_layers="4"), r"num_hidden_layers must be an integer, got '4' \(str\)"),
    (lambda d: d["text"].update(vocab_size=97.0), r"vocab_size must be an integer, got 97\.0"),
    (lambda d: d["text"].update(max_position_embeddings=0), r"max_position_embeddings must be >= 1, got 0"),
    (lambda d: d["text"].update(rms_norm_eps=0), r"rms_norm_eps must be positive"),
    (lambda d: d["text"].update(rope_theta=float("nan")), r"rope_theta must be a finite number"),
    (lambda d: d["text"].update(flux_capacitor=1), r"unknown field\(s\) \['text\.flux_capacitor'\]"),
    (lambda d: d.update(flux_capacitor=1), r"unknown field\(s\) \['flux_capacitor'\]"),
    (lambda d: d["vision"]["clip"].update(num_attention_heads=5), r"VisionConfig: hidden_size=32 is not divisible"),
    (lambda d: d["vision"]["clip"].update(image_size=-42), r"image_size must be a positive integer, got -42"),
    (lambda d: d["mod"].update(avg_ratio=2.0), r"avg_ratio=2\.0 is outside \(0, 1\]"),
    (lambda d: d["mod"].update(max_ratio=0.01, min_ratio=0.01, avg_ratio=0.9), r"gives no MoD layer"),
    (lambda d: d.update(model_max_length="2048"), r"model_max_length must be an integer"),
])
def test_bad_config_json_fields_are_named(tmp_path, edit, msg):
    folder = _ours(tmp_path, edit)
    with pytest.raises(CheckpointError, match=msg) as e:
        pmod.load_config(folder)
    assert "config.json" in str(e.value)


@pytest.mark.parametrize("field,value,msg", [
    ("num_key_value_heads", 0, "num_key_value_heads must be >= 1"),
    ("num_attention_heads", "4", "num_attention_heads must be an integer"),
    ("hidden_size", -64, "hidden_size must be >= 1"),
    ("max_position_embeddings", 0, "max_position_embeddings must be >= 1"),
])
def test_bad_official_config_fields_are_named(tmp_path, official_dir, field, value, msg):
    shutil.copytree(official_dir / "checkpoint", tmp_path / "ckpt")
    raw = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    raw[field] = value
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=msg):
        pmod.load_config(tmp_path / "ckpt")


def test_official_config_missing_a_field_is_named(tmp_path, official_dir):
    shutil.copytree(official_dir / "checkpoint", tmp_path / "ckpt")
    raw = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    raw.pop("vocab_size")
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="required field 'vocab_size' is missing"):
        pmod.load_config(tmp_path / "ckpt")


def test_mod_config_refuses_values_that_would_be_silently_dense():
    with pytest.raises(ValueError, match=r"avg_ratio=2\.0 is outside"):
        ModConfig(avg_ratio=2.0)
    with pytest.raises(ValueError, match=r"avg_ratio must be a finite number"):
        ModConfig(avg_ratio=float("nan"))
    with pytest.raises(ValueError, match=r"router_init_std must be >= 0"):
        ModConfig(router_init_std=-1.0)
    assert ModConfig(schedule="none", avg_ratio=2.0).schedule == "none"  # unused by a dense model


def test_text_and_vision_config_direct_construction():
    with pytest.raises(ValueError, match="num_key_value_heads must be >= 1"):
        TextConfig(num_key_value_heads=0)
    with pytest.raises(ValueError, match="a SigLIP tower has no CLS token"):
        VisionConfig(backend="siglip", select_feature="cls_patch")
    with pytest.raises(ValueError, match="select_layer=-40 is outside a 12-layer tower"):
        VisionConfig(select_layer=-40)


# --- built-in towers ---------------------------------------------------------------------------------------------
@pytest.fixture
def offline_empty_cache(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE=1 with an empty cache: nothing can come from the hub."""
    import huggingface_hub.constants as hc

    cache = tmp_path / "empty-hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    return cache


def _released_config(tmp_path, official_dir, tower: str, **llm) -> object:
    """The official fixture's config.json at the released 7B shapes (Vicuna-7B), naming the tower by hub id."""
    raw = json.loads((official_dir / "checkpoint" / "config.json").read_text())
    raw.update({"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
                "num_key_value_heads": 32, "vocab_size": 32000, "mm_hidden_size": 1024, "mm_vision_tower": tower, **llm})
    folder = tmp_path / "released"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(raw))
    return folder


def test_load_config_and_flops_on_a_released_config_alone(tmp_path, official_dir, offline_empty_cache, capsys):
    folder = _released_config(tmp_path, official_dir, "openai/clip-vit-large-patch14-336")
    cfg = pmod.load_config(folder)
    v = cfg.vision
    assert (v.backend, v.hidden_size, v.image_size, v.patch_size, v.num_patches) == ("clip", 1024, 336, 14, 576)
    assert v.clip["num_hidden_layers"] == 24 and v.clip["num_attention_heads"] == 16 and v.clip["intermediate_size"] == 4096
    assert v.clip["hidden_act"] == "quick_gelu" and v.clip["projection_dim"] == 768 and v.clip["layer_norm_eps"] == 1e-5
    rep = pmod.count_flops(cfg, n_vision=576, n_text=58, convention="paper")
    assert round(rep.total / 1e12, 2) == 4.92 and round(rep.dense_total / 1e12, 2) == 8.38  # the paper's LLaVA-1.5 numbers
    from pmod.cli import main

    assert main(["flops", "--model", str(folder), "--n-vision", "576", "--n-text", "58"]) == 0
    assert "4.92" in capsys.readouterr().out


def test_builtin_clip_224_and_siglip(tmp_path, official_dir, offline_empty_cache):
    cfg = pmod.load_config(_released_config(tmp_path, official_dir, "openai/clip-vit-large-patch14"))
    assert (cfg.vision.image_size, cfg.vision.num_patches, cfg.vision.hidden_size) == (224, 256, 1024)
    shutil.rmtree(tmp_path / "released")
    cfg = pmod.load_config(_released_config(tmp_path, official_dir, "google/siglip-so400m-patch14-384"))
    v = cfg.vision
    assert (v.backend, v.hidden_size, v.image_size, v.patch_size, v.num_patches) == ("siglip", 1152, 384, 14, 729)
    assert (v.clip["intermediate_size"], v.clip["num_hidden_layers"], v.clip["num_attention_heads"]) == (4304, 27, 16)
    assert v.clip["hidden_act"] == "gelu_pytorch_tanh" and v.clip["layer_norm_eps"] == 1e-6
    assert v.image_mean == (0.5, 0.5, 0.5) and v.image_std == (0.5, 0.5, 0.5)
    rep = pmod.count_flops(cfg, n_vision=729, n_text=58, convention="complete", include_vision=True)
    assert rep.total > 0


def test_unknown_tower_says_what_to_download(tmp_path, official_dir, offline_empty_cache):
    folder = _released_config(tmp_path, official_dir, "someone/unknown-tower")
    with pytest.raises(FileNotFoundError, match=r"someone/unknown-tower.*hf download someone/unknown-tower") as e:
        pmod.load_config(folder)
    assert isinstance(e.value, CheckpointError)


def test_a_cached_tower_config_wins_over_the_builtin(tmp_path, official_dir, offline_empty_cache):
    rev = "1" * 40
    snap = offline_empty_cache / "models--openai--clip-vit-large-patch14-336" / "snapshots" / rev
    snap.mkdir(parents=True)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text(rev)
    (snap / "config.json").write_text(json.dumps({"model_type": "clip", "vision_config": {
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 56,
        "patch_size": 14}}))
    cfg = pmod.load_config(_released_config(tmp_path, official_dir, "openai/clip-vit-large-patch14-336", mm_hidden_size=64))
    assert (cfg.vision.hidden_size, cfg.vision.image_size) == (64, 56)
