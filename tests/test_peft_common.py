"""Shared helpers of the fine-tuning strategy tests, and the registry / protocol checks every strategy passes."""
from __future__ import annotations

import pytest
import torch
from conftest import make_batch, tiny_model

import pmod.peft as peft_strategies
from pmod.training.config import TrainConfig
from pmod.peft.strategy import Strategy
from pmod.training.stages import stage_roles

FINETUNE = stage_roles("finetune")
ALL = ["bone", "full", "gradnormlorp", "lisa", "lora", "lora-ggpo", "lora-mgpo", "miss", "ticket"]




def batch(seed: int = 0) -> dict:
    ids, mask, n = make_batch([(3, 1, 5), (2, 1, 7), (6, 0, 3)], seed=seed)
    g = torch.Generator().manual_seed(seed)
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "images": torch.randn(n, 3, 42, 42, generator=g), "labels": labels}


def cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"learning_rate": 1e-2, **kw})


@torch.no_grad()
def logits(model, b: dict) -> torch.Tensor:
    was = model.training
    model.eval()
    out = model(input_ids=b["input_ids"], images=b["images"], attention_mask=b["attention_mask"]).logits
    model.train(was)
    return out


def prepared(name: str, model_seed: int = 0, **options):
    """(model, strategy, optimizer) as the training loop builds them, in train mode."""
    model = tiny_model(model_seed).train()
    strategy = peft_strategies.get_strategy(name, **options)
    strategy.prepare(model, FINETUNE)
    return model, strategy, strategy.build_optimizer(model, cfg())


def run_steps(model, strategy, opt, steps: int, start: int = 0, seed: int = 0, on_step=None) -> None:
    """The loop's order of hooks (pmod.training.step.train_step), one micro-batch per step."""
    for step in range(start, start + steps):
        b = batch(seed + step)
        strategy.on_step_begin(step, model, opt)
        with strategy.forward_context(model):
            out = model(input_ids=b["input_ids"], images=b["images"], attention_mask=b["attention_mask"], labels=b["labels"])
            out.loss.backward()
        strategy.after_backward(model)
        if on_step is not None:
            on_step(step, "after_backward")
        opt.step()
        opt.zero_grad(set_to_none=True)
        strategy.after_optimizer_step(step, model, opt)
        if on_step is not None:
            on_step(step, "after_step")


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def check_merged_and_reloaded(model, strategy, b: dict, folder) -> None:
    """The merged state dict in a plain model, and the saved adapter reloaded, give `model`'s logits on `b`."""
    ref = logits(model, b)
    plain = tiny_model()
    plain.load_state_dict(strategy.merge_state(dict(model.state_dict())))
    assert (logits(plain, b) - ref).abs().max() <= 1e-5
    strategy.save(model, folder)
    again, _ = peft_strategies.load_trained(tiny_model(), folder)
    assert torch.equal(logits(again, b), ref)


def test_registry_lists_every_strategy_and_each_fits_the_protocol():
    assert set(ALL) <= set(peft_strategies.list_strategies())  # other tests may register their own
    for name in ALL:
        opts = {"random": True} if name == "ticket" else {}
        assert isinstance(peft_strategies.get_strategy(name, **opts), Strategy)
    with pytest.raises(ValueError, match="unknown fine-tuning strategy 'nope'"):
        peft_strategies.get_strategy("nope")


def test_bad_options_are_named():
    with pytest.raises(ValueError, match=r"'lora': r: a positive integer, got 0; dropout: in \[0, 1\), got 2"):
        peft_strategies.get_strategy("lora", r=0, dropout=2)
    with pytest.raises(ValueError, match="also_train names unknown role"):
        peft_strategies.get_strategy("lora", also_train=["routers"])
    with pytest.raises(ValueError, match="routers are never targets"):
        peft_strategies.get_strategy("bone", targets=["router"])
    with pytest.raises(TypeError):
        peft_strategies.get_strategy("lisa", rank=3)


@pytest.mark.parametrize("name,options", [("lora", {"r": 4}), ("gradnormlorp", {"lora_r": 4}), ("bone", {"r": 16}),
                                          ("miss", {"r": 16}), ("lora-ggpo", {"r": 4}), ("lora-mgpo", {"r": 4}),
                                          ("ticket", {"random": True})])
def test_routers_are_never_adapted_and_train_with_the_projector_by_default(name, options):
    model, strategy, _ = prepared(name, **options)
    for n, p in model.named_parameters():
        if n.startswith("language_model.routers."):
            assert p.requires_grad and n.endswith((".weight", ".bias")) and n.count(".") == 3, n
        if n.startswith("projector."):
            assert p.requires_grad, n
        if n.startswith(("vision_tower.", "lm_head.", "language_model.embed_tokens.", "language_model.norm.")):
            assert not p.requires_grad, n
    assert all(type(r) is torch.nn.Linear for r in model.language_model.routers.values())
    # overridable: nothing beside the adapters
    model, strategy, _ = prepared(name, also_train=[], **options)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in strategy.adapter_params(model).items()}


def test_bitsandbytes_kernel_probe_filter():
    """pmod.peft drops bitsandbytes' one message about the `kernels` hub package, and only that one."""
    import logging

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    record = lambda msg: logging.LogRecord(logger.name, logging.WARNING, __file__, 1, msg, None, None)
    assert not logger.filter(record("Failed to load CPU gemm_4bit_forward from kernels-community: No module named "
                                    "'kernels'. Please make sure you already `pip install kernels`"))
    assert logger.filter(record("something else went wrong"))


@pytest.mark.slow
def test_bitsandbytes_kernel_probe_is_silenced():
    """Importing peft (it imports bitsandbytes) after pmod.peft prints nothing about the `kernels` hub package; the
    same import without pmod.peft shows that the message exists on this machine (else there is nothing to test)."""
    import subprocess
    import sys

    pytest.importorskip("bitsandbytes")
    run = lambda code: subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300).stderr
    if "kernels-community" not in run("import peft"):
        pytest.skip("bitsandbytes logs no kernels probe on this CPU")
    assert "kernels-community" not in run("import pmod.peft, peft")
