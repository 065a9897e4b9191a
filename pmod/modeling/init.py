"""Fresh weights for a newly built model (its decoder side), every tensor's init in one place."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["init_weights"]


@torch.no_grad()
def init_weights(model, std: float | None = None):
    """Fresh weights for the decoder side of `model` (the vision tower keeps transformers'/timm's init); returns it.

    Linear and embedding weights ~ N(0, std) (std defaults to 0.02, LLaMA's initializer_range),
    biases 0, norms 1; routers ~ N(0, mod.router_init_std) with bias 0: zero by default, so a
    new p-MoD model starts with w = norm_bias (= 1 for TanhNorm), i.e. STRing is the identity.
    image_newline ~ N(0, 1/sqrt(C)) as LLaVA-NeXT initialises it.
    """
    std = 0.02 if std is None else std
    lm = model.language_model
    for name, mod in [*lm.named_modules(prefix="language_model"), ("projector", model.projector), ("lm_head", model.lm_head)]:
        if name.startswith("language_model.routers"):
            continue
        if isinstance(mod, (nn.Linear, nn.Embedding)):
            mod.weight.normal_(0.0, std)
            if getattr(mod, "bias", None) is not None:
                mod.bias.zero_()
        elif hasattr(mod, "eps") and hasattr(mod, "weight"):  # RMSNorm
            mod.weight.fill_(1.0)
    for proj in model.projector.modules():
        if isinstance(proj, nn.Linear):
            proj.weight.normal_(0.0, std)
            proj.bias.zero_()
    for router in lm.routers.values():
        router.weight.normal_(0.0, model.config.mod.router_init_std) if model.config.mod.router_init_std else router.weight.zero_()
        if router.bias is not None:
            router.bias.zero_()
    if hasattr(model, "image_newline"):
        model.image_newline.normal_(0.0, model.config.text.hidden_size**-0.5)
    return model
