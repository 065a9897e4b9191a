"""The Grokking-ticket pieces (pmod/grokking.py): the data split, the two models against float64 references, the
ticket's sparsity, the rewind, pruned weights that never move under AdamW with weight decay, the random control,
the official neuron revival, and the driver end to end on a tiny modulus."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pmod.grokking import (GrokConfig, ModAddMLP, ModAddTransformer, build_model, control_mask, density, labels,
                           revive_dead_neurons, rewind, split, steps_to, ticket_mask, train)

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("symmetric", [True, False])
def test_split_is_a_disjoint_cover_of_all_pairs_with_the_requested_fraction(symmetric):
    p, frac = 97, 0.4
    tr, te = split(p, frac, seed=3, symmetric=symmetric)
    total = p * (p + 1) // 2 if symmetric else p * p
    assert len(tr) == int(frac * total) and len(tr) + len(te) == total
    keys = lambda x: set((x[:, 0] * p + x[:, 1]).tolist())  # noqa: E731
    assert not keys(tr) & keys(te)
    assert len(keys(tr) | keys(te)) == total
    if symmetric:
        assert bool((tr[:, 0] <= tr[:, 1]).all()) and bool((te[:, 0] <= te[:, 1]).all())
    again, other = split(p, frac, seed=3, symmetric=symmetric)[0], split(p, frac, seed=4, symmetric=symmetric)[0]
    assert torch.equal(tr, again) and not torch.equal(tr, other)
    y = labels(tr, p)
    assert all(int(y[i]) == (int(tr[i, 0]) + int(tr[i, 1])) % p for i in range(0, len(tr), 37))


def test_mlp_matches_a_float64_one_hot_reference():
    m = ModAddMLP(11, d_emb=17, d_hidden=5, seed=1).double()
    pairs = torch.tensor([[0, 0], [3, 9], [10, 10], [4, 2]])
    onehot = F.one_hot(pairs[:, 0], 11).double() + F.one_hot(pairs[:, 1], 11).double()  # [B, P]
    ref = torch.clamp(onehot @ m.embed @ m.w_in.T, min=0) @ m.w_out.T @ m.unembed
    torch.testing.assert_close(m(pairs), ref, rtol=0, atol=1e-12)
    assert torch.allclose(m(pairs), m(pairs.flip(1)))  # the sum of embeddings is symmetric in (a, b)


def test_transformer_matches_an_eager_float64_reference():
    torch.manual_seed(0)
    m = ModAddTransformer(13, d_model=12, heads=3, d_mlp=20, seed=2).double()
    pairs = torch.tensor([[1, 2], [12, 0], [5, 5]])
    x = m.embed[pairs]  # [B, 2, C]
    out = []
    for b in range(len(pairs)):
        heads = []
        for h in range(3):
            sl = slice(4 * h, 4 * h + 4)
            q, k, v = x[b] @ m.w_q[:, sl], x[b] @ m.w_k[:, sl], x[b] @ m.w_v[:, sl]  # [2, D]
            s = q @ k.T / math.sqrt(4) + torch.tensor([[0.0, -math.inf], [0.0, 0.0]], dtype=torch.float64)
            heads.append(torch.softmax(s, -1) @ v)
        r = x[b] + torch.cat(heads, -1) @ m.w_o
        r = r + torch.clamp(r @ m.w_in, min=0) @ m.w_out
        out.append(r[-1] @ m.unembed)
    torch.testing.assert_close(m(pairs), torch.stack(out), rtol=0, atol=1e-12)


def test_init_is_deterministic_and_scaled_as_the_official_code():
    a, b = ModAddMLP(97, seed=5), ModAddMLP(97, seed=5)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.embed, ModAddMLP(97, seed=6).embed)
    for w, std in ((a.embed, 1 / math.sqrt(97)), (a.w_in, 1 / math.sqrt(500)), (a.w_out, 1 / math.sqrt(48)),
                   (a.unembed, 1 / math.sqrt(500))):
        assert abs(w.std().item() / std - 1) < 0.05  # >= 24k entries each: the sample std is within 1 %


def _trained_like(seed=0):
    g = torch.Generator().manual_seed(seed)
    m = ModAddMLP(11, d_emb=17, d_hidden=5, seed=seed)
    return m, {n: torch.randn(p.shape, generator=g) for n, p in m.named_parameters()}


@pytest.mark.parametrize("keep", [0.1, 0.4, 0.73])
def test_ticket_keeps_the_sparsity_and_the_largest_magnitudes_globally(keep):
    _, trained = _trained_like()
    masks = ticket_mask(trained, keep)
    total = sum(t.numel() for t in trained.values())
    assert sum(int(m.sum()) for m in masks.values()) == round(keep * total)
    assert density(masks) == pytest.approx(round(keep * total) / total)
    kept = torch.cat([trained[n].abs()[masks[n]] for n in trained])
    pruned = torch.cat([trained[n].abs()[~masks[n]] for n in trained])
    assert kept.min() >= pruned.max()
    per_tensor = {n: m.float().mean().item() for n, m in masks.items()}
    assert len({round(v, 3) for v in per_tensor.values()}) > 1  # global, not per-tensor, thresholding
    ctrl = control_mask(trained, keep, seed=1)
    assert sum(int(m.sum()) for m in ctrl.values()) == round(keep * total)
    assert any(not torch.equal(ctrl[n], masks[n]) for n in masks)


def test_rewind_equals_init_on_kept_weights_and_zero_elsewhere():
    model, trained = _trained_like()
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # "trained"
    masks = ticket_mask(trained, 0.4)
    rewind(model, init, masks)
    for n, p in model.named_parameters():
        assert torch.equal(p[masks[n]], init[n][masks[n]])
        assert bool((p[~masks[n]] == 0).all())
    rewind(model, init, None)
    assert all(torch.equal(p, init[n]) for n, p in model.named_parameters())


def test_pruned_weights_never_move_under_adamw_with_weight_decay_and_kept_ones_do():
    cfg = GrokConfig(p=11, d_emb=17, d_hidden=5, steps=25, eval_every=5, weight_decay=1.0)
    model = build_model(cfg)
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = control_mask(init, 0.4, seed=0)
    rewind(model, init, masks)
    hist = train(model, cfg, masks=masks)
    assert hist["step"] == [0, 5, 10, 15, 20, 25]
    for n, p in model.named_parameters():
        assert bool((p[~masks[n]] == 0).all()), n
        assert not torch.equal(p[masks[n]], init[n][masks[n]]), n


def test_training_fits_the_train_split_and_stops_after_the_threshold():
    cfg = GrokConfig(p=11, d_emb=64, d_hidden=32, steps=400, eval_every=10, weight_decay=0.0, lr=1e-2)
    hist = train(build_model(cfg), cfg, stop_at=0.0, stop_patience=20)
    assert hist["step"][-1] == 20  # test acc >= 0 at step 0, then 20 more steps
    hist = train(build_model(cfg), cfg)
    assert hist["train_acc"][-1] == 1.0 and hist["train_loss"][-1] < hist["train_loss"][0]
    assert steps_to(hist, 1.0, "train_acc") is not None and steps_to(hist, 2.0) is None


def test_revive_dead_neurons_restores_fully_pruned_rows_and_columns_only():
    masks = {"w_in": torch.ones(4, 6, dtype=torch.bool), "w_out": torch.ones(6, 4, dtype=torch.bool),
             "embed": torch.zeros(3, 6, dtype=torch.bool)}
    masks["w_in"][1] = False
    masks["w_in"][2, :5] = False
    masks["w_out"][:, 3] = False
    out = revive_dead_neurons(masks)
    assert out["w_in"][1].all() and int(out["w_in"][2].sum()) == 1 and out["w_out"][:, 3].all()
    assert not out["embed"].any() and not masks["w_in"][1].any()  # the input is not modified


def test_config_names_the_bad_values():
    with pytest.raises(ValueError, match=r"arch='cnn'.*frac_train=1\.5"):
        GrokConfig(arch="cnn", frac_train=1.5)
    with pytest.raises(ValueError, match="heads=5"):
        GrokConfig(arch="transformer", heads=5)


def test_driver_and_report_end_to_end_on_a_tiny_modulus(tmp_path):
    cmd = [sys.executable, str(REPO / "train" / "grokking_tickets.py"), "--arch", "mlp", "--p", "7", "--max-steps",
           "30", "--dense-patience", "5", "--patience", "5", "--eval-every", "5", "--out", str(tmp_path), "--runs", "dense", "ticket", "random",
           "ticket-wd0", "ticket-local", "ticket-newinit", "ticket-delta"]
    subprocess.run(cmd, check=True, capture_output=True, cwd=REPO)
    subprocess.run(cmd[:2] + ["--report", "--out", str(tmp_path)], check=True, capture_output=True, cwd=REPO)
    res = json.loads((tmp_path / "results.json").read_text())
    runs = {r["run"] for r in res["rows"]}
    assert {"dense", "ticket", "ticket-wd0", "random", "ticket-local", "ticket-newinit", "ticket-delta"} <= runs
    dens = {r["run"]: r["density"] for r in res["rows"]}
    assert dens["random"] == pytest.approx(dens["ticket"]) and dens["dense"] == 1.0
    assert (tmp_path / "results.png").read_bytes()[:4] == b"\x89PNG" and "| mlp, P=7, 40 % train |" in (tmp_path / "results.md").read_text()
