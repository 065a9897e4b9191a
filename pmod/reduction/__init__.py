"""Training-free vision-token reduction (FastV, PyramidDrop, VisionZip-style, random, uniform) over pmod's packed
execution and reduced KV cache: `pmod.from_pretrained(path, reduction="fastv", layer=2, keep=0.5)` or
`model.reduction = ReductionSpec(...)`. This package's root holds only the spec (pure; `pmod.flops` counts with
it); the modules that run a reduction (`policy`, `drop`, `scores`, `visionzip`) are imported by the model."""
from pmod.reduction.spec import METHODS, ReductionSpec, make_spec, visionzip_split

__all__ = ["METHODS", "ReductionSpec", "make_spec", "visionzip_split", "check_reduction"]


def check_reduction(config, spec) -> ReductionSpec | None:
    """`spec` (a ReductionSpec, a method name with its defaults, or None) checked against a model's config."""
    spec = make_spec(spec, config.text.num_hidden_layers) if isinstance(spec, str) else spec
    if spec is None:
        return None
    if not isinstance(spec, ReductionSpec):
        raise ValueError(f"reduction={spec!r}: expected a ReductionSpec, a method name {METHODS} or None")
    spec.check(config.text.num_hidden_layers)
    v = config.vision
    if spec.method == "visionzip" and not (v.backend == "clip" and v.select_feature == "patch"
                                           and config.image_aspect_ratio in ("pad", "square")):
        raise ValueError(f"visionzip needs a CLIP tower (CLS attention) with select_feature='patch' and image_aspect_ratio "
                         f"'pad' or 'square'; this model has backend={v.backend!r}, select_feature={v.select_feature!r}, "
                         f"image_aspect_ratio={config.image_aspect_ratio!r}")
    return spec
