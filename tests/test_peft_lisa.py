"""LISA: γ whole layers per interval, switches only at step % K == 0, frozen layers bitwise still, always-on
parts move every step, Adam state of the projected size with reset, reproducible, ZeRO-3 refused."""
from __future__ import annotations

import pytest
import torch
from test_peft_common import prepared, run_steps

import pmod.peft as peft_strategies
from pmod.peft.lisa import lisa_layers


def _layer_state(model) -> list[bool]:
    """Per decoder layer: True if all its parameters train, False if none; a partly trainable layer fails."""
    out = []
    for layer in model.language_model.layers:
        flags = {p.requires_grad for p in layer.parameters()}
        assert len(flags) == 1, "a layer is partly trainable"
        out.append(flags.pop())
    return out


def test_gamma_layers_per_interval_switching_only_at_multiples_of_k_and_frozen_layers_still():
    model, strategy, opt = prepared("lisa", activated_layers=2, interval_steps=3, seed=7)
    layers = model.language_model.layers
    always = {n: p for n, p in model.named_parameters() if not n.startswith("language_model.layers.") and p.requires_grad}
    seen: dict[int, list[int]] = {}
    prev: dict[str, torch.Tensor] = {}

    def check(step: int, when: str) -> None:
        active = [i for i, on in enumerate(_layer_state(model)) if on]
        assert len(active) == 2 and active == strategy.active
        seen[step] = active
        if when == "after_step":
            for i, layer in enumerate(layers):
                for k, p in layer.named_parameters():
                    key = f"{i}.{k}"
                    if i not in active and step % 3 and key in prev:
                        assert torch.equal(p, prev[key]), f"frozen layer {i} moved at step {step}"
                    prev[key] = p.detach().clone()
            for n, p in always.items():  # embeddings / head / norm / routers / projector move every step
                if n in prev:
                    assert not torch.equal(p, prev[n]), f"{n} did not move at step {step}"
                prev[n] = p.detach().clone()

    run_steps(model, strategy, opt, 9, on_step=check)
    for j in range(3):
        got = {tuple(seen[s]) for s in range(3 * j, 3 * j + 3)}
        assert got == {tuple(lisa_layers(4, 2, 7, j))}, "the active set changed inside an interval"


def test_always_on_roles_cover_embeddings_head_norm_routers_projector():
    model, strategy, opt = prepared("lisa", interval_steps=2)
    run_steps(model, strategy, opt, 1)
    for n, p in model.named_parameters():
        if n.startswith(("language_model.embed_tokens.", "lm_head.", "language_model.norm.", "language_model.routers.", "projector.")):
            assert p.requires_grad, n
        if n.startswith("vision_tower."):
            assert not p.requires_grad, n


def _state_elements(opt) -> int:
    return sum(st[k].numel() for st in opt.state.values() for k in ("exp_avg", "exp_avg_sq") if k in st)


@pytest.mark.parametrize("reset", [True, False])
def test_optimizer_state_is_the_active_size_with_reset(reset):
    model, strategy, opt = prepared("lisa", activated_layers=1, interval_steps=2, reset_state=reset, seed=3)
    always = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and not n.startswith("language_model.layers."))
    layer = sum(p.numel() for p in model.language_model.layers[0].parameters())
    sizes = []
    run_steps(model, strategy, opt, 8, on_step=lambda s, w: sizes.append(_state_elements(opt)) if w == "after_step" else None)
    if reset:
        assert set(sizes) == {2 * (always + layer)}
    else:  # the reference code's behaviour: state grows with every layer ever sampled
        distinct = len({i for s in range(0, 8, 2) for i in lisa_layers(4, 1, 3, s // 2)})
        assert sizes[-1] == 2 * (always + distinct * layer) and distinct > 1


def test_reproducible_with_a_seed_and_resumable_mid_interval():
    a, sa, oa = prepared("lisa", interval_steps=3, seed=11)
    run_steps(a, sa, oa, 5)
    b, sb, ob = prepared("lisa", interval_steps=3, seed=11)
    run_steps(b, sb, ob, 4)
    resumed = peft_strategies.get_strategy("lisa", interval_steps=3)
    resumed.prepare(b, {"projector", "router", "embed", "decoder", "norm", "head"})
    resumed.load_state_dict(sb.state_dict())
    run_steps(b, resumed, ob, 1, start=4)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k


def test_refuses_zero3_and_a_stage_without_the_decoder():
    s = peft_strategies.get_strategy("lisa")
    with pytest.raises(ValueError, match="ZeRO-3"):
        s.check_distributed("DistributedType.DEEPSPEED", 3)
    s.check_distributed("DistributedType.DEEPSPEED", 2)
    from conftest import tiny_model

    with pytest.raises(ValueError, match="samples decoder layers"):
        s.prepare(tiny_model(), {"projector"})
    with pytest.raises(ValueError, match="exceeds the model's 4 layers"):
        peft_strategies.get_strategy("lisa", activated_layers=5).prepare(tiny_model(), {"decoder"})
