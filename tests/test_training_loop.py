"""The training loop on CPU: both stages learn, accumulation is exact, the strategy seam, recipes and the CLI."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_training_toys import assert_same_training, losses, toy_config, write_data, write_llm_and_clip, write_model

import pmod
from pmod.training import RECIPES, BaseStrategy, list_strategies, register_strategy, train
from pmod.io.state import load_tree
from pmod.training.checkpoint import clean_partial, latest_checkpoint, list_checkpoints



REPO = Path(__file__).resolve().parents[1]


def _fell(run: Path) -> tuple[float, float]:
    ls = losses(run)
    return sum(ls[:3]) / 3, sum(ls[-5:]) / 5


def test_finetune_learns_and_exports_a_loadable_pmod_model(tmp_path):
    model_dir = write_model(tmp_path / "m")
    missing = {"id": "gone", "image": "nope.png", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "red"}]}
    data = write_data(tmp_path / "d", n=24, extra=[missing])
    cfg = toy_config(tmp_path, model_dir, data, max_steps=30, save_steps=10, save_total_limit=2)
    res = train(cfg)
    first, last = _fell(res.output)
    assert last < 0.4 * first, f"loss did not fall: {first:.3f} -> {last:.3f}"
    logs = [json.loads(x) for x in (res.output / "train_log.jsonl").read_text().splitlines()]
    routed = [entry for entry in logs if any(k.startswith("routing/") for k in entry)]
    assert routed and all(0.0 < v for e in routed for k, v in e.items() if k.startswith("routing/"))
    assert {"lr", "tokens_per_s", "grad_norm"} <= set(logs[0])
    assert [p.name for p in list_checkpoints(res.output)] == ["step-00000020", "step-00000030"]  # save_total_limit
    skipped = json.loads((res.output / "skipped_samples.json").read_text())
    assert skipped["before_training"]["counts"] == {"missing_image": 1}
    # the export is a pmod checkpoint with its processor: it loads, routes and answers
    model, proc = pmod.from_pretrained(res.output, dtype=torch.float32), pmod.load_processor(res.output)
    assert not model.config.is_dense and proc.template.name == "chat_nosys"
    inputs = proc("what color is this ?", images=[tmp_path / "d" / "images" / "green.png"])
    assert proc.decode(model.generate(**inputs, max_new_tokens=1, do_sample=False)[0]) == "green"


def test_pretrain_from_llm_and_clip_trains_the_projector_only(tmp_path):
    llm, clip = write_llm_and_clip(tmp_path / "hf")
    data = write_data(tmp_path / "d", n=12, caption=True)
    cfg = toy_config(tmp_path, llm, data, vision_tower=str(clip), stage="pretrain", template=None, max_steps=25,
                     learning_rate=1e-2, save_steps=25)
    res = train(cfg)
    first, last = _fell(res.output)
    assert last < 0.6 * first, f"loss did not fall: {first:.3f} -> {last:.3f}"
    assert res.exported.name == "mm_projector.safetensors"
    proj = load_file(res.exported)
    assert sorted(proj) == ["model.mm_projector.0.bias", "model.mm_projector.0.weight", "model.mm_projector.2.bias", "model.mm_projector.2.weight"]
    # LLM and vision tower bitwise unchanged
    final = load_file(latest_checkpoint(res.output) / "model.safetensors")
    hf = load_file(llm / "model.safetensors")
    for k, v in hf.items():
        if k.startswith("model.layers."):
            assert torch.equal(final["language_model." + k.removeprefix("model.")], v), k
    clip_w = load_file(clip / "model.safetensors")
    assert torch.equal(final["vision_tower.model.embeddings.patch_embedding.weight"], clip_w["vision_model.embeddings.patch_embedding.weight"])
    # the fine-tuning stage starts from it (LLaVA's mm_projector.bin key names)
    from pmod.training.build import build

    built = build(toy_config(tmp_path, llm, data, vision_tower=str(clip), pretrain_mm_projector=str(res.output)))
    assert torch.equal(built.model.projector[0].weight, proj["model.mm_projector.0.weight"])
    assert not built.model.config.is_dense  # fine-tuning converts the dense LLM to p-MoD by default


def test_gradient_accumulation_equals_the_bigger_batch(tmp_path):
    model_dir = write_model(tmp_path / "m")
    data = write_data(tmp_path / "d", n=16)
    common = {"max_steps": 4, "group_by_modality_length": False, "save_steps": 100}
    big = train(toy_config(tmp_path, model_dir, data, output=str(tmp_path / "big"), per_device_batch_size=4, **common))
    acc = train(toy_config(tmp_path, model_dir, data, output=str(tmp_path / "acc"), per_device_batch_size=2,
                           gradient_accumulation_steps=2, **common))
    assert_same_training(big.output, acc.output, model_dir)
    # resuming with settings that change the data order or the schedule is refused before anything loads
    with pytest.raises(ValueError, match="per_device_batch_size: saved 4, given 2.*cannot change on resume"):
        train(toy_config(tmp_path, model_dir, data, output=str(tmp_path / "big"), per_device_batch_size=2, resume="latest", **common))


def test_bf16_autocast_with_gradient_checkpointing_and_accumulation(tmp_path):
    model_dir = write_model(tmp_path / "m")
    data = write_data(tmp_path / "d", n=12)
    res = train(toy_config(tmp_path, model_dir, data, max_steps=10, mixed_precision="bf16", gradient_checkpointing=True,
                           gradient_accumulation_steps=2, per_device_batch_size=2))
    first, last = _fell(res.output)
    assert last < 0.7 * first, (first, last)


def test_llava_next_anyres_with_several_images_per_sample(tmp_path):
    model_dir = write_model(tmp_path / "m", anyres=True)
    two = {"id": "pair", "image": ["red.png", "blue.png"], "conversations": [
        {"from": "human", "value": "<image> <image> what color is this ?"}, {"from": "gpt", "value": "red"}]}
    data = write_data(tmp_path / "d", n=8, extra=[two] * 4)
    res = train(toy_config(tmp_path, model_dir, data, max_steps=8))
    first, last = _fell(res.output)
    assert last < first and pmod.load_config(res.output).image_aspect_ratio == "anyres"


def test_finetune_from_the_official_pmod_checkpoint_format(tmp_path, official_dir):
    tok = write_model(tmp_path / "tok")  # only its tokenizer is used: the fixture has none
    data = write_data(tmp_path / "d", n=8)
    res = train(toy_config(tmp_path, official_dir / "checkpoint", data, tokenizer=str(tok), max_steps=3, learning_rate=1e-3))
    assert res.loss is not None and math.isfinite(res.loss)
    assert pmod.load_config(official_dir / "checkpoint").mod_ratios == pmod.load_config(res.output).mod_ratios


@register_strategy("test-routers-only")
class RoutersOnly(BaseStrategy):
    """Trains the MoD routers alone and counts its hook calls: exercises every point of the seam."""

    def __init__(self, **options):
        super().__init__()
        self.calls = {"begin": 0, "backward": 0, "step": 0}

    def prepare(self, model, roles):
        return super().prepare(model, {"router"})

    def on_step_begin(self, step, model, optimizer):
        self.calls["begin"] += 1

    def after_backward(self, model):
        self.calls["backward"] += 1

    def after_optimizer_step(self, step, model, optimizer):
        self.calls["step"] += 1

    def state_dict(self):
        return dict(self.calls)

    def load_state_dict(self, state):
        self.calls = dict(state)


def test_strategy_seam_chooses_parameters_hooks_steps_and_checkpoints(tmp_path, monkeypatch):
    assert "full" in list_strategies() and "test-routers-only" in list_strategies()
    seen = []
    monkeypatch.setattr(RoutersOnly, "export", lambda self, model, state, folder: seen.append(dict(self.calls)) or state)
    model_dir = write_model(tmp_path / "m")
    data = write_data(tmp_path / "d", n=8, text_only_every=0)
    res = train(toy_config(tmp_path, model_dir, data, strategy="test-routers-only", max_steps=3, save_steps=3))
    assert seen == [{"begin": 3, "backward": 3, "step": 3}]
    before, after = load_file(model_dir / "model.safetensors"), load_file(res.output / "model.safetensors")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".routers." in k for k in changed)
    assert load_tree(latest_checkpoint(res.output), "strategy") == seen[0]  # JSON, never a pickle
    with pytest.raises(ValueError, match="unknown fine-tuning strategy 'nope'"):
        train(toy_config(tmp_path, model_dir, data, strategy="nope"))


def test_partial_checkpoints_are_ignored_and_cleaned(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "step-00000004").mkdir(parents=True)
    (root / "step-00000004" / "trainer_state.json").write_text("{}")
    (root / "step-00000008").mkdir()  # renamed but incomplete cannot happen; unmarked folders are ignored anyway
    (root / ".tmp-step-00000012").mkdir()
    assert latest_checkpoint(tmp_path).name == "step-00000004"
    assert [p.name for p in clean_partial(tmp_path)] == [".tmp-step-00000012"] and not (root / ".tmp-step-00000012").exists()


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_yaml_files_mirror_the_presets(name):
    assert yaml.safe_load((REPO / "train" / "recipes" / f"{name}.yaml").read_text()) == RECIPES[name]


def test_cli_precedence_recipe_then_yaml_then_flags(tmp_path, capsys):
    from pmod.cli import main

    (tmp_path / "r.yaml").write_text("recipe: pmod-llava-next\nlearning_rate: 1.0e-5\nper_device_batch_size: 2\n")
    rc = main(["train", "--config", str(tmp_path / "r.yaml"), "--per-device-batch-size", "1", "--mod-avg-ratio", "0.4",
               "--strategy-option", "r=16", "--no-gradient-checkpointing", "--print-config"])
    got = yaml.safe_load(capsys.readouterr().out)
    assert rc == 0
    assert got["model_max_length"] == 4096 and got["image_aspect_ratio"] == "anyres"  # recipe
    assert got["learning_rate"] == 1e-5 and got["per_device_batch_size"] == 1  # YAML, then the flag over it
    assert got["mod"]["avg_ratio"] == 0.4 and got["mod"]["max_ratio"] == 0.85 and got["strategy_options"] == {"r": 16}
    assert got["gradient_checkpointing"] is False
    assert main(["train", "--recipe", "tiny-cpu", "--data", "x.json", "--output", "o"]) == 2  # --model missing
    assert "--model" in capsys.readouterr().err
