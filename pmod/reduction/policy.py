"""A training-free reduction applied during one prefill: where each method scores, where it drops.

FastV scores with layer K-1's attention (computed on that layer's input, before it runs) and drops at layer K's
input; PyramidDrop scores with a stage layer's own attention on its input and drops before that layer runs;
random and uniform need no model. `Reducer.before(i, ...)` is called at every decoder layer's input.
"""
from __future__ import annotations

import torch

from pmod.packing import Layout
from pmod.reduction.drop import DropState, drop_vision
from pmod.reduction.scores import last_token_attention, random_scores, uniform_scores, vision_attention_scores
from pmod.reduction.spec import ReductionSpec
from pmod.schedule import kept_count

__all__ = ["Reducer"]


class Reducer:
    """One forward's drops (a fresh one per prefill). `layers`: the decoder's layers (the scoring attentions)."""

    def __init__(self, spec: ReductionSpec, layers):
        self.spec, self.layers = spec, layers
        self.drop_at = set(spec.layers)
        self.score_at = {i - 1 for i in spec.layers} if spec.method == "fastv" else set(spec.layers)
        self.state = DropState()
        self.pending: torch.Tensor | None = None  # fastv: [B, M] attention of layer K-1, for the drop at K

    def before(self, i: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: Layout):
        """At layer i's input: returns (x, cos, sin, layout), reduced if a drop happens here."""
        if self.spec.method == "fastv" and i in self.drop_at:
            x, cos, sin, layout = self._drop(i, x, cos, sin, layout, self.pending)
        if i in self.score_at and layout.has_vision and self.spec.method in ("fastv", "pyramiddrop"):
            self.pending = last_token_attention(self.layers[i], x, cos, sin, layout)  # [B, M]
        if self.spec.method != "fastv" and i in self.drop_at:
            x, cos, sin, layout = self._drop(i, x, cos, sin, layout, self.pending)
        return x, cos, sin, layout

    def _drop(self, i: int, x, cos, sin, layout: Layout, attention: torch.Tensor | None):
        if not layout.has_vision:
            return x, cos, sin, layout
        k = [kept_count(n, self.spec.keep) for n in layout.n_vision]
        if self.spec.method == "random":
            scores = random_scores(layout, self.spec.seed)
        elif self.spec.method == "uniform":
            scores = uniform_scores(layout, k)
        else:
            scores = vision_attention_scores(attention, layout)
        new, idx = drop_vision(layout, scores, k)
        self.state.drop(x, idx)
        return x.index_select(0, idx), cos.index_select(0, idx), sin.index_select(0, idx), new

    def restore(self, x: torch.Tensor) -> torch.Tensor:
        """The last layer's output with every dropped token back at its place (its state when it was dropped)."""
        return self.state.restore(x)
