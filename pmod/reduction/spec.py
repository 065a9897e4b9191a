"""Training-free vision-token reduction: which method, where, how much. A validated spec and pure token counts.

A spec says at which decoder layers vision tokens leave the sequence for good (they are not processed, and not
cached, by that layer or any later one) and how many stay, or (VisionZip) how many feature tokens each image gives
the decoder at all. `vision_per_layer` turns it into the vision tokens each decoder layer processes: the counts
`pmod.flops` and the KV accounting use, and the sizes the decoder's drops allocate.

Methods and their defaults (paper / official code, and where ours differs):
* ``fastv`` (Chen et al. 2024): at layer K (default 2) keep the `keep` share (default 0.5: R = 50 %) of the vision
  tokens that got the most attention from the last token in layer K-1, averaged over heads.
* ``pyramiddrop`` (Xing et al. 2024): at each stage layer (official LLaVA-1.5: 8, 16, 24 of 32, i.e. L/4, L/2, 3L/4,
  rounded) keep λ = `keep` (default 0.5) of the vision tokens still there, ranked by the last instruction token's
  attention at that layer (its own q and k, before the layer runs).
* ``visionzip`` (Yang et al. 2024): before the decoder, `keep` of an image's P patch tokens; of those, 27/32 are
  dominant (most attended by CLS at the tower's selected layer; official 54 + 10 of 64, 162 + 30 of 192, 108 + 20 of
  128) and the rest contextual (the remaining tokens merged into evenly spaced targets by key similarity).
* ``random``: a seeded random subset of each row's vision tokens at `layer` (default 0: before the decoder).
* ``uniform``: evenly spaced vision tokens of each row (raster order: a grid when the stride divides the width).
Kept counts are trunc(n · keep) in float32, as p-MoD's k (`pmod.schedule.kept_count`).
"""
from __future__ import annotations

from dataclasses import dataclass

from pmod.schedule import kept_count

__all__ = ["METHODS", "ReductionSpec", "make_spec", "visionzip_split"]

METHODS = ("fastv", "pyramiddrop", "visionzip", "random", "uniform")
VISIONZIP_DOMINANT = 27 / 32  # 54/64 = 162/192 = 108/128 of the kept tokens are dominant


@dataclass(frozen=True)
class ReductionSpec:
    """method: one of METHODS; layers: the decoder layers at whose input tokens are dropped (ascending; empty for
    visionzip); keep: the share kept at each of them (of the tokens still there); seed: the random method's seed."""

    method: str
    layers: tuple[int, ...] = ()
    keep: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"ReductionSpec: method={self.method!r}; expected one of {METHODS}")
        if isinstance(self.keep, bool) or not isinstance(self.keep, (int, float)) or not 0.0 < self.keep <= 1.0:
            raise ValueError(f"ReductionSpec: keep={self.keep!r} must be a share in (0, 1]")
        layers = tuple(self.layers)
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers) or list(layers) != sorted(set(layers)):
            raise ValueError(f"ReductionSpec: layers={self.layers!r} must be distinct layer indices >= 0, ascending")
        if (self.method == "visionzip") != (not layers):
            raise ValueError(f"ReductionSpec: {self.method} " + ("reduces before the decoder and takes no layers"
                             if self.method == "visionzip" else "needs at least one layer"))
        if self.method == "fastv" and layers[0] == 0:
            raise ValueError("ReductionSpec: fastv at layer 0 has no earlier layer's attention to rank by; use layer >= 1")
        if self.method in ("fastv", "random", "uniform") and len(layers) != 1:
            raise ValueError(f"ReductionSpec: {self.method} drops at one layer, got layers={layers}")
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "keep", float(self.keep))

    def check(self, num_layers: int) -> None:
        """Raise if a layer is outside a decoder of `num_layers` layers."""
        bad = [i for i in self.layers if i >= num_layers]
        if bad:
            raise ValueError(f"ReductionSpec: layers {bad} outside a {num_layers}-layer decoder (0..{num_layers - 1})")

    def vision_per_layer(self, num_layers: int, n_vision: int, tokens_per_image: int | None = None) -> list[int]:
        """Vision tokens of one row each decoder layer processes (before any MoD routing), from the row's n_vision
        tokens of the unreduced model; visionzip needs `tokens_per_image` (n_vision is whole images of it)."""
        self.check(num_layers)
        n = n_vision
        if self.method == "visionzip":
            if not tokens_per_image or n_vision % tokens_per_image:
                raise ValueError(f"visionzip: n_vision={n_vision} is not whole images of tokens_per_image={tokens_per_image}")
            n = (n_vision // tokens_per_image) * sum(visionzip_split(tokens_per_image, self.keep))
        out = []
        for i in range(num_layers):
            if i in self.layers:
                n = kept_count(n, self.keep)
            out.append(n)
        return out

    def describe(self) -> str:
        where = "before the decoder" if not self.layers else "at layer" + ("s " if len(self.layers) > 1 else " ") + ", ".join(map(str, self.layers))
        return f"{self.method} keep {self.keep:g} {where}" + (f" (seed {self.seed})" if self.method == "random" else "")


def visionzip_split(patches: int, keep: float) -> tuple[int, int]:
    """(dominant, contextual) tokens of an image of `patches` tokens at `keep`: k = trunc(patches · keep) in all,
    trunc(27/32 · k) of them dominant (at least 1), the rest contextual."""
    k = max(1, kept_count(patches, keep))
    dominant = max(1, int(k * VISIONZIP_DOMINANT))
    return dominant, k - dominant


def default_layers(method: str, num_layers: int) -> tuple[int, ...]:
    """Each method's default drop layers in a decoder of `num_layers` layers (see the module docstring)."""
    if method == "fastv":
        return (min(2, num_layers - 1),)
    if method == "pyramiddrop":
        return tuple(sorted({max(1, round(num_layers * f)) for f in (0.25, 0.5, 0.75)} - {num_layers}))
    if method in ("random", "uniform"):
        return (0,)
    return ()


def make_spec(reduction, num_layers: int | None = None, *, layer: int | None = None, layers=None, keep: float | None = None,
              seed: int | None = None) -> ReductionSpec | None:
    """A spec from `from_pretrained`'s arguments: `reduction` a ReductionSpec (then no other argument), a method
    name (with `layer` or `layers`, `keep`, `seed`; the method's defaults otherwise), or None."""
    extra = {k: v for k, v in dict(layer=layer, layers=layers, keep=keep, seed=seed).items() if v is not None}
    if reduction is None:
        if extra:
            raise ValueError(f"{sorted(extra)} given without reduction=; pass reduction='fastv' (or another of {METHODS})")
        return None
    if isinstance(reduction, ReductionSpec):
        if extra:
            raise ValueError(f"reduction is a ReductionSpec: put {sorted(extra)} in it, not beside it")
        spec = reduction
    elif isinstance(reduction, str):
        if layer is not None and layers is not None:
            raise ValueError("pass layer= (one drop layer) or layers= (several), not both")
        if reduction not in METHODS:
            raise ValueError(f"reduction={reduction!r}: expected one of {METHODS}")
        if layer is None and layers is None and reduction in ("fastv", "pyramiddrop") and num_layers is None:
            raise ValueError(f"{reduction}'s default layers follow the decoder's depth: pass num_layers")
        chosen = (layer,) if layer is not None else (tuple(layers) if layers is not None else default_layers(reduction, num_layers or 1))
        spec = ReductionSpec(reduction, chosen, 0.5 if keep is None else keep, 0 if seed is None else seed)
    else:
        raise ValueError(f"reduction={reduction!r}: expected a method name {METHODS}, a ReductionSpec or None")
    if num_layers is not None:
        spec.check(num_layers)
    return spec
