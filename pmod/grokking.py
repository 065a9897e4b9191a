"""Grokking tickets in the paper's setting (Minegishi et al., "Bridging Lottery Ticket and Grokking", arXiv
2310.19470): modular addition a + b mod P, full-batch AdamW, the paper's MLP and a one-layer transformer.

The experiment (`train/grokking_tickets.py`): train a dense network from W_0 until it generalises, keep the top
fraction of its weights by |W| (global over every weight matrix, as the official `Mag` pruner), rewind to W_0
under that mask, retrain, and count the steps until 95 % test accuracy; a random mask of the same density is the
control. The mask math is `pmod.peft.ticket`'s (one implementation of the pruning rule in the package); masks
live beside the model, never in it: pruned entries are zeroed and their gradients masked after backward, so
AdamW never moves them (its decoupled decay of a zero is zero, and Adam's update with m = v = 0 is zero). The
official code multiplies W by a mask buffer in every forward instead; the function computed is the same.

Letters: B pairs, P modulus (vocabulary and classes), E embedding width, M hidden width, C model width,
H heads, D head dim.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pmod.peft.ticket import density, magnitude_mask, random_mask

__all__ = ["GrokConfig", "ModAddMLP", "ModAddTransformer", "build_model", "split", "labels", "ticket_mask",
           "control_mask", "revive_dead_neurons", "rewind", "train", "steps_to", "density"]


@dataclass(frozen=True)
class GrokConfig:
    """One run. Defaults: the official `config_pruning.py` (lr 1e-3, weight decay 1, betas (0.9, 0.98), 40 %
    training pairs with a <= b, MLP E=500 / M=48, keep 0.4) at the issue's P = 97. The transformer follows Nanda
    et al.'s one-layer model (C=128, 4 heads, no LayerNorm, no biases) with the official config's MLP width
    d_mlp = d_model, and without positional embeddings, as the official `Transformer` (its pos-embed line is
    commented out)."""

    arch: str = "mlp"  # mlp | transformer
    p: int = 97
    frac_train: float = 0.4
    symmetric: bool = True  # only pairs a <= b, as the official `is_symmetric_input`
    d_emb: int = 500  # MLP
    d_hidden: int = 48  # MLP
    d_model: int = 128  # transformer
    heads: int = 4
    d_mlp: int = 128  # the official config's d_mlp = 1 * d_model (Nanda et al. used 512)
    lr: float = 1e-3
    weight_decay: float = 1.0
    betas: tuple[float, float] = (0.9, 0.98)
    steps: int = 10_000
    eval_every: int = 10
    seed: int = 0  # initialisation
    data_seed: int = 0
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        bad = [f"{k}={v!r}" for k, v, ok in (
            ("arch", self.arch, self.arch in ("mlp", "transformer")), ("p", self.p, self.p >= 3),
            ("frac_train", self.frac_train, 0 < self.frac_train < 1), ("steps", self.steps, self.steps >= 1),
            ("eval_every", self.eval_every, self.eval_every >= 1), ("lr", self.lr, self.lr > 0),
            ("weight_decay", self.weight_decay, self.weight_decay >= 0),
            ("heads", self.heads, self.heads >= 1 and self.d_model % self.heads == 0)) if not ok]
        if bad:
            raise ValueError(f"GrokConfig: invalid {', '.join(bad)}")


def split(p: int, frac_train: float, seed: int = 0, symmetric: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(train [N, 2], test [M, 2]) int64 pairs: every (a, b) (a <= b when symmetric) shuffled by `seed`, the first
    floor(frac · total) train, the rest test. Disjoint, and together all pairs."""
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    pairs = torch.stack([a.flatten(), b.flatten()], 1)  # [P·P, 2]
    if symmetric:
        pairs = pairs[pairs[:, 0] <= pairs[:, 1]]  # [P(P+1)/2, 2]
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed))
    n = int(frac_train * len(pairs))
    return pairs[order[:n]], pairs[order[n:]]


def labels(pairs: torch.Tensor, p: int) -> torch.Tensor:
    return (pairs[:, 0] + pairs[:, 1]) % p  # [B]


def _normal(*shape: int, std: float, g: torch.Generator) -> nn.Parameter:
    return nn.Parameter(torch.randn(*shape, generator=g) * std)


class ModAddMLP(nn.Module):
    """The official `OnlyMLP` with no hidden layers: logits = relu((e_a + e_b) W_inᵀ) W_outᵀ W_U. Initialisation
    std as the official: embed 1/√P, in 1/√E, out 1/√M, unembed 1/√E."""

    def __init__(self, p: int, d_emb: int = 500, d_hidden: int = 48, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed = _normal(p, d_emb, std=1 / math.sqrt(p), g=g)  # [P, E]
        self.w_in = _normal(d_hidden, d_emb, std=1 / math.sqrt(d_emb), g=g)  # [M, E]
        self.w_out = _normal(d_emb, d_hidden, std=1 / math.sqrt(d_hidden), g=g)  # [E, M]
        self.unembed = _normal(d_emb, p, std=1 / math.sqrt(d_emb), g=g)  # [E, P]

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:  # pairs [B, 2] -> logits [B, P]
        # relu((e_a + e_b) W_inᵀ) W_outᵀ W_U with the linear maps folded through the P-row vocabulary first:
        # the same function (tests: a one-hot float64 reference), ~12x fewer FLOPs at P=97, E=500, M=48.
        h = F.relu(F.embedding(pairs, self.embed @ self.w_in.T).sum(1))  # [B, M]
        return h @ (self.w_out.T @ self.unembed)  # [B, P]


class ModAddTransformer(nn.Module):
    """One pre-residual block without LayerNorm or biases: x + attn(x), then + mlp(·), logits at the last
    position. Causal attention over the two tokens; init std 1/√C for Q, K, V, O and the MLP, embed 1/√P."""

    def __init__(self, p: int, d_model: int = 128, heads: int = 4, d_mlp: int = 512, seed: int = 0):
        super().__init__()
        g, c = torch.Generator().manual_seed(seed), d_model
        self.heads = heads
        self.embed = _normal(p, c, std=1 / math.sqrt(p), g=g)  # [P, C]
        self.w_q, self.w_k, self.w_v = (_normal(c, c, std=1 / math.sqrt(c), g=g) for _ in range(3))  # [C, H·D]
        self.w_o = _normal(c, c, std=1 / math.sqrt(c), g=g)  # [H·D, C]
        self.w_in = _normal(c, d_mlp, std=1 / math.sqrt(c), g=g)  # [C, M]
        self.w_out = _normal(d_mlp, c, std=1 / math.sqrt(c), g=g)  # [M, C]
        self.unembed = _normal(c, p, std=1 / math.sqrt(c), g=g)  # [C, P]

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:  # pairs [B, 2] -> logits [B, P]
        # Only the last position's output is read, so only its query, residual and MLP are computed; K and V of
        # both tokens come from the vocabulary projected once ((embed W)[tokens] = embed[tokens] W). The same
        # function as the full causal block (tests: an eager float64 reference), ~2x fewer FLOPs.
        b, c, h = pairs.shape[0], self.embed.shape[1], self.heads
        q = F.embedding(pairs[:, 1], self.embed @ self.w_q).view(b, 1, h, c // h)  # [B, 1, H, D]
        k, v = (F.embedding(pairs, self.embed @ w).view(b, 2, h, c // h) for w in (self.w_k, self.w_v))  # [B, 2, H, D]
        att = torch.softmax((q * k).sum(-1) / math.sqrt(c // h), 1)  # [B, 2, H]: the last token sees both
        z = (att.unsqueeze(-1) * v).sum(1)  # [B, H, D]; elementwise: a batched 1x2 matmul is slower on CPU
        x = F.embedding(pairs[:, 1], self.embed) + z.reshape(b, c) @ self.w_o  # [B, C]
        x = x + F.relu(x @ self.w_in) @ self.w_out
        return x @ self.unembed  # [B, P]


def build_model(cfg: GrokConfig) -> nn.Module:
    if cfg.arch == "mlp":
        return ModAddMLP(cfg.p, cfg.d_emb, cfg.d_hidden, cfg.seed)
    return ModAddTransformer(cfg.p, cfg.d_model, cfg.heads, cfg.d_mlp, cfg.seed)


def ticket_mask(trained: dict[str, torch.Tensor], keep: float) -> dict[str, torch.Tensor]:
    """Global magnitude mask over every weight of the trained (generalised) network: the top `keep` by |W|."""
    return magnitude_mask({n: w.abs() for n, w in trained.items()}, keep)


def control_mask(like: dict[str, torch.Tensor], keep: float, seed: int) -> dict[str, torch.Tensor]:
    """Uniformly random mask with the same number of kept entries (round(keep · total))."""
    return random_mask(like, keep, seed)


def revive_dead_neurons(masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The official `relive_neurons` (MLP): a hidden neuron whose every input (row of w_in) or every output
    (column of w_out) is pruned gets that whole row / column back, so no hidden unit starts dead. Raises the
    density slightly; the control should then match the result's density."""
    out = dict(masks)
    if "w_in" in out:
        w_in = out["w_in"].clone()  # [M, E]
        w_in[~w_in.any(1)] = True
        out["w_in"] = w_in
    if "w_out" in out:
        w_out = out["w_out"].clone()  # [E, M]
        w_out[:, ~w_out.any(0)] = True
        out["w_out"] = w_out
    return out


@torch.no_grad()
def rewind(model: nn.Module, init: dict[str, torch.Tensor], masks: dict[str, torch.Tensor] | None) -> None:
    """Load the initial weights W_0 and zero the pruned entries: W = W_0 ⊙ M."""
    for n, prm in model.named_parameters():
        prm.copy_(init[n] if masks is None else init[n] * masks[n])


def _loss(model: nn.Module, pairs: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(pairs)  # [B, P]
    return F.cross_entropy(logits.double(), y), logits  # float64 loss as the official `cross_entropy_high_precision`


def _acc(logits: torch.Tensor, y: torch.Tensor) -> float:
    return (logits.argmax(-1) == y).double().mean().item()


def train(model: nn.Module, cfg: GrokConfig, masks: dict[str, torch.Tensor] | None = None,
          data: tuple[torch.Tensor, torch.Tensor] | None = None, stop_at: float | None = None,
          stop_patience: int = 0, on_eval: Callable[[int, dict], None] | None = None) -> dict[str, list[float]]:
    """Full-batch AdamW for cfg.steps steps; every cfg.eval_every steps (and at step 0 and the last) the full
    train / test loss and accuracy, then `on_eval(step, hist)` (e.g. to snapshot the weights). With `stop_at`,
    stop `stop_patience` steps after test accuracy first reaches it."""
    train_pairs, test_pairs = data if data is not None else split(cfg.p, cfg.frac_train, cfg.data_seed, cfg.symmetric)
    y_train, y_test = labels(train_pairs, cfg.p), labels(test_pairs, cfg.p)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas)
    params = dict(model.named_parameters())
    hist: dict[str, list[float]] = {"step": [], "train_loss": [], "test_loss": [], "train_acc": [], "test_acc": []}
    reached = None
    for step in range(cfg.steps + 1):
        loss, logits = _loss(model, train_pairs, y_train)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            with torch.no_grad():
                test_loss, test_logits = _loss(model, test_pairs, y_test)
                acc, test_acc = _acc(logits, y_train), _acc(test_logits, y_test)
            for k, v in zip(hist, (step, loss.item(), test_loss.item(), acc, test_acc)):
                hist[k].append(v)
            if on_eval is not None:
                on_eval(step, hist)
            if stop_at is not None and reached is None and test_acc >= stop_at:
                reached = step
            if reached is not None and step >= reached + stop_patience:
                break
        if step == cfg.steps:
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if masks is not None:
            for n, m in masks.items():
                params[n].grad.mul_(m)
        opt.step()
    return hist


def steps_to(hist: dict[str, list[float]], threshold: float = 0.95, key: str = "test_acc") -> int | None:
    """The first evaluated step whose `key` is >= threshold (None: never within the run)."""
    return next((s for s, a in zip(hist["step"], hist[key]) if a >= threshold), None)
