"""VisionZip-style features: an image's dominant patch tokens plus merged contextual ones, before the projector.

As the official code (dvlab-research/VisionZip, LLaVA's clip_encoder): at the tower's selected layer, rank patches by
the attention CLS gives them (summed over heads) and keep the top `dominant` in raster order; of the other patches,
take `contextual` evenly spaced targets (stride n // contextual) and add to each target the mean of the non-target
tokens whose head-averaged key is most similar (cosine) to its key. The CLS attention row and the keys are computed
here from the selected layer's input (its own layer norm and projections), one query row per image: no attention
matrix is asked of the tower, so it runs under any attention implementation. Ours differs in one point: the CLS
feature is not kept (LLaVA's 'patch' selection drops it; the official code passes it on as a 65th token of 64).
Legend: I images, T = 1 + P tower tokens, P patches, h heads, e head dim, Cv tower width.
"""
from __future__ import annotations

import torch

__all__ = ["visionzip_features"]


def visionzip_features(tower, pixels: torch.Tensor, dominant: int, contextual: int) -> torch.Tensor:
    """[I, dominant + contextual, Cv] features of pixels [I, 3, S, S] through a CLIP `tower` (pmod CLIPTower)."""
    out = tower.model(pixel_values=pixels.to(tower.dtype), output_hidden_states=True)
    hs = out.hidden_states  # L + 1 of [I, T, Cv]; hs[j] is layer j's output (hs[0]: the embeddings)
    a = tower.cfg.select_layer % len(hs)
    if a == 0:
        raise ValueError("visionzip: the tower's select_layer picks the embeddings, which no attention produced")
    feats = hs[a]  # [I, T, Cv]
    layer = tower.model.encoder.layers[a - 1]
    attn = layer.self_attn
    h = layer.layer_norm1(hs[a - 1])  # [I, T, Cv], the selected layer's attention input
    I, T, _ = h.shape
    heads, e = attn.num_heads, attn.head_dim
    q = attn.q_proj(h[:, :1]).view(I, heads, e).float()  # [I, h, e] CLS query
    k = attn.k_proj(h).view(I, T, heads, e)  # [I, T, h, e]
    cls = (torch.einsum("ihe,ithe->iht", q, k.float()) * attn.scale).softmax(-1).sum(1)[:, 1:]  # [I, P]
    metric = k.mean(2)[:, 1:].float()  # [I, P, e] keys averaged over heads
    patches = feats[:, 1:]  # [I, P, Cv]
    P = patches.shape[1]
    if not (1 <= dominant and dominant + contextual <= P):
        raise ValueError(f"visionzip: {dominant} dominant + {contextual} contextual tokens of {P} patches")
    top = cls.topk(dominant, dim=1).indices.sort(dim=1).values  # [I, dominant] raster order
    picked = torch.zeros(I, P, dtype=torch.bool, device=patches.device).scatter(1, top, True)
    rest = (~picked).float().argsort(dim=1, descending=True, stable=True)[:, : P - dominant].sort(dim=1).values  # [I, R]
    dom = patches.gather(1, top[..., None].expand(-1, -1, patches.shape[-1]))  # [I, dominant, Cv]
    if contextual == 0:
        return dom
    R = P - dominant
    step = max(1, R // contextual)
    is_target = torch.zeros(R, dtype=torch.bool)
    is_target[torch.arange(0, R, step)[:contextual]] = True  # on the host: R and the stride are sizes, not data
    tgt, src = (i.nonzero().flatten().to(patches.device) for i in (is_target, ~is_target))
    m = metric.gather(1, rest[..., None].expand(-1, -1, e))
    m = m / m.norm(dim=-1, keepdim=True)  # [I, R, e]
    hid = patches.gather(1, rest[..., None].expand(-1, -1, patches.shape[-1]))  # [I, R, Cv]
    sim = torch.bmm(m[:, src], m[:, tgt].transpose(1, 2))  # [I, R - c, c]
    assign = torch.zeros_like(sim).scatter(2, sim.argmax(dim=2, keepdim=True), 1.0)  # one-hot [I, R - c, c]
    counts = assign.sum(dim=1).clamp(min=1)[..., None]  # [I, c, 1]
    merged = torch.bmm(assign.transpose(1, 2).to(hid.dtype), hid[:, src]) / counts.to(hid.dtype)  # [I, c, Cv]
    return torch.cat([dom, hid[:, tgt] + merged], dim=1)  # official: target + mean of its assigned tokens
