"""`pmod generate` and `pmod train` (p-MoD conversion + fine-tuning) on LLaVA-OneVision and Qwen2.5-VL checkpoints."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from test_onevision import tiny_onevision_hf
from test_onevision_processor import chat_tokenizer
from test_qwen2_5_vl import tiny_qwen_hf
from test_qwen2_5_vl_processor import qwen_tokenizer
from test_qwen3_vl import tiny_qwen3_hf

import pmod
from pmod.cli import main
from pmod.tools.synthetic import write_split

FAMILIES = {"onevision": (tiny_onevision_hf, chat_tokenizer), "qwen2_5_vl": (tiny_qwen_hf, qwen_tokenizer),
            "qwen3_vl": (tiny_qwen3_hf, qwen_tokenizer)}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm")
    for name, (build, tok) in FAMILIES.items():
        build(root / name)
        tok().save_pretrained(root / name)
    write_split(root / "data", "train", 6, 64)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (45, 97, 3), dtype=np.uint8)).save(root / "a.png")
    return root


# options the tiny widths need (bone's r x r blocks must divide 32, 64 and 96) or a strategy cannot start without
OPTIONS = {"bone": ["r=16"], "miss": ["r=16"], "ticket": ["random=true"]}


def train(root, family, strategy, steps=2):
    out = root / f"out-{family}-{strategy}"
    opts = [a for o in OPTIONS.get(strategy, []) for a in ("--strategy-option", o)]
    rc = main(["train", "--recipe", "tiny-cpu", "--model", str(root / family), "--data", str(root / "data" / "train.json"),
               "--image-folder", str(root / "data"), "--output", str(out), "--max-steps", str(steps), "--strategy", strategy,
               *opts])
    assert rc == 0
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_generate_on_a_dense_checkpoint(checkpoints, family, capsys):
    assert main(["generate", "--model", str(checkpoints / family), "--image", str(checkpoints / "a.png"),
                 "--prompt", "what is in this image ?", "--max-new-tokens", "4"]) == 0
    assert "vision tokens" in capsys.readouterr().err


@pytest.mark.parametrize("family, strategy", [("onevision", "full"), ("qwen2_5_vl", "lora"), ("qwen3_vl", "full")])
def test_train_converts_to_pmod_and_the_result_loads_and_generates(checkpoints, family, strategy, capsys):
    out = train(checkpoints, family, strategy)
    model = pmod.from_pretrained(out)
    assert not model.config.is_dense  # the paper's schedule over the tiny depth
    assert model.config.text.qkv_bias == (family != "qwen3_vl")
    assert model.config.vision.backend == {"onevision": "siglip", "qwen2_5_vl": "qwen2_5_vl", "qwen3_vl": "qwen3_vl"}[family]
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines() if x.strip()]
    assert any("loss" in r for r in log)
    capsys.readouterr()
    assert main(["generate", "--model", str(out), "--image", str(checkpoints / "a.png"), "--prompt", "what ?",
                 "--max-new-tokens", "3"]) == 0
    err = capsys.readouterr().err
    assert "kept per stage" in err


@pytest.mark.parametrize("family, recipe", [("onevision", "pmod-onevision"), ("qwen2_5_vl", "pmod-qwen2.5-vl")])
def test_the_family_recipe_runs_on_a_tiny_checkpoint(checkpoints, family, recipe):
    """The 7B recipe as written (template, schedule, gradient checkpointing, lr), sized down to one CPU step."""
    out = checkpoints / f"recipe-{family}"
    assert main(["train", "--recipe", recipe, "--model", str(checkpoints / family), "--data", str(checkpoints / "data" / "train.json"),
                 "--image-folder", str(checkpoints / "data"), "--output", str(out), "--max-steps", "1", "--per-device-batch-size", "2",
                 "--gradient-accumulation-steps", "1", "--num-workers", "0", "--mixed-precision", "no", "--no-tf32"]) == 0
    cfg = pmod.load_config(out)
    assert not cfg.is_dense and cfg.conv_template == {"onevision": "chatml", "qwen2_5_vl": "qwen2_vl"}[family]  # "qwen" is chatml


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("strategy", pmod.list_strategies())
def test_every_strategy_trains(checkpoints, family, strategy):
    train(checkpoints, family, strategy, steps=2)


@pytest.mark.slow
def test_eval_runs_on_both(checkpoints):
    """`pmod eval` (lmms-eval's own CLI in a subprocess) on the local pmod_synth task, a p-MoD-converted OneVision
    beside a trained Qwen2.5-VL."""
    pytest.importorskip("lmms_eval", reason="the eval extra is not installed")
    ov, qw = train(checkpoints, "onevision", "full"), train(checkpoints, "qwen2_5_vl", "full")
    out = checkpoints / "eval"
    assert main(["eval", "--model", str(ov), "--compare", str(qw), "--tasks", "pmod_synth", "--limit", "3",
                 "--output", str(out), "--quiet"]) == 0
    models = json.loads((out / "results.json").read_text())["models"]
    assert len(models) == 2 and all("pmod_synth" in m["scores"] for m in models)
