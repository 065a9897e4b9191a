"""`PmodConfig.from_name`: the named shapes are the released models' and build as such."""
from __future__ import annotations

import pytest
import torch

import pmod
from pmod.config import ModConfig, PmodConfig
from pmod.io.towers import BUILTIN_TOWERS
from pmod.multimodal.anyres import NEXT_GRIDS, pinpoints_from_grids
from pmod.presets import PRESETS


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_and_round_trips(name):
    cfg = PmodConfig.from_name(name)
    assert PmodConfig.from_dict(cfg.to_dict()) == cfg


def test_llava_presets_are_the_released_shapes():
    seven, next_ = PmodConfig.from_name("llava-1.5-7b"), PmodConfig.from_name("llava-next-7b")
    assert seven.text == next_.text
    assert seven.vision.clip == BUILTIN_TOWERS["openai/clip-vit-large-patch14-336"]["config"]
    assert (seven.vision.num_patches, seven.image_aspect_ratio) == (576, "pad")
    assert next_.image_grid_pinpoints == pinpoints_from_grids(NEXT_GRIDS[4], 336)
    with torch.device("meta"):
        model = pmod.PmodForConditionalGeneration(PmodConfig.from_name("llava-1.5-13b", mod=ModConfig(schedule="none")))
    n = sum(p.numel() for k, p in model.named_parameters() if k.startswith(("language_model", "lm_head")))
    assert 13.0e9 < n < 13.1e9  # Vicuna-13B


def test_changes_update_a_part_and_unknown_names_are_refused():
    cfg = PmodConfig.from_name("synth-compare", text={"vocab_size": 50}, mod=ModConfig(schedule="none"))
    assert (cfg.text.vocab_size, cfg.text.hidden_size, cfg.is_dense) == (50, 128, True)
    with pytest.raises(ValueError, match=r"unknown preset 'llava-9b'.*llava-1.5-7b"):
        PmodConfig.from_name("llava-9b")
