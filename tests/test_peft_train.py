"""Strategies through `pmod train`'s loop: the export is a plain, merged checkpoint that loads without training
code and matches the saved adapters re-applied to the base; a resumed run with strategy state repeats an
uninterrupted one."""
from __future__ import annotations

import json

import pytest
import torch
from test_training_toys import toy_config, write_data, write_model

import pmod
import pmod.peft as peft_strategies
from pmod.training import train


def _probe(processor_dir, image):
    return pmod.load_processor(processor_dir)("what color is this ?", images=[image])


@pytest.mark.parametrize("strategy,options", [("lora", {"r": 4, "alpha": 8}), ("bone", {"r": 16})])
def test_export_is_merged_and_equals_the_saved_adapters_on_the_base(tmp_path, strategy, options):
    model_dir = write_model(tmp_path / "m")
    data = write_data(tmp_path / "d", n=8, text_only_every=0)
    res = train(toy_config(tmp_path, model_dir, data, strategy=strategy, strategy_options=options, max_steps=3, save_steps=3))
    meta = json.loads((res.exported / "strategy" / "strategy.json").read_text())
    assert meta["strategy"] == strategy and meta["options"]["r"] == options["r"]
    merged = pmod.from_pretrained(res.exported, dtype=torch.float32)  # plain pmod checkpoint: no adapter keys
    assert all(type(m) is torch.nn.Linear for m in peft_strategies.target_linears(merged).values())
    base, _ = peft_strategies.load_trained(pmod.from_pretrained(model_dir, dtype=torch.float32), res.exported)
    inputs = _probe(res.exported, tmp_path / "d" / "images" / "green.png")
    with torch.no_grad():
        a = merged.eval()(**inputs).logits
        b = base.eval()(**inputs).logits
    assert (a - b).abs().max() <= 1e-5
    assert not torch.equal(a, pmod.from_pretrained(model_dir, dtype=torch.float32).eval()(**inputs).logits)


def test_resume_with_strategy_state_repeats_the_uninterrupted_run(tmp_path):
    model_dir = write_model(tmp_path / "m")
    data = write_data(tmp_path / "d", n=8, text_only_every=0)
    opts = {"r": 4, "alpha": 8, "dropout": 0.0, "sigma": 0.5, "beta": 0.5}
    full = train(toy_config(tmp_path, model_dir, data, output=str(tmp_path / "a"), strategy="lora-ggpo", strategy_options=opts,
                            max_steps=4, save_steps=2))

    class Stop(Exception):
        pass

    class StopAt2:
        def on_save(self, step, path):
            if step == 2:
                raise Stop

    with pytest.raises(Stop):
        train(toy_config(tmp_path, model_dir, data, output=str(tmp_path / "b"), strategy="lora-ggpo", strategy_options=opts,
                         max_steps=4, save_steps=2), callbacks=[StopAt2()])
    resumed = train(toy_config(tmp_path, model_dir, data, output=str(tmp_path / "b"), strategy="lora-ggpo", strategy_options=opts,
                               max_steps=4, save_steps=2, resume="latest"))
    from safetensors.torch import load_file

    wa, wb = load_file(full.exported / "model.safetensors"), load_file(resumed.exported / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6), k
