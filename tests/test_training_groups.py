"""Optimizer groups of the full strategy: weight decay on matrices only, per-role learning rates."""
from __future__ import annotations

from conftest import tiny_model

from pmod.training import TrainConfig, get_strategy
from pmod.peft.roles import param_role, set_trainable
from pmod.training.stages import stage_roles


def _groups(**lrs):
    model = tiny_model(layers=6)
    set_trainable(model, stage_roles("finetune", train_vision_tower=True))
    cfg = TrainConfig(model="unused", data="unused", learning_rate=1e-3, weight_decay=0.1, **lrs)
    opt = get_strategy("full").build_optimizer(model, cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    return opt, [({param_role(names[id(p)]) for p in g["params"]}, g) for g in opt.param_groups], model


def test_per_role_learning_rates_and_decay():
    opt, groups, model = _groups(router_lr=1e-5, vision_tower_lr=2e-4, projector_lr=3e-3)
    want = {"router": 1e-5, "vision": 2e-4, "projector": 3e-3}
    for roles, g in groups:
        lr = {want.get(r, 1e-3) for r in roles}
        assert len(lr) == 1 and g["lr"] == lr.pop(), (roles, g["lr"])
        assert g["weight_decay"] == (0.1 if g["params"][0].ndim >= 2 else 0.0)
        assert all((p.ndim >= 2) == (g["params"][0].ndim >= 2) for p in g["params"])
    covered = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert covered == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_without_role_rates_every_group_takes_the_base_rate():
    opt, groups, _ = _groups()
    assert len(opt.param_groups) == 2 and all(g["lr"] == 1e-3 for g in opt.param_groups)
