"""The benchmarked models: a dense model with random weights, p-MoD twins sharing its modules, and
`transformers.LlamaForCausalLM` holding the very same tensors."""

from __future__ import annotations

import torch
from torch import nn

from pmod.bench.presets import Preset
from pmod.config import ModConfig
from pmod.modeling.llava import PmodForConditionalGeneration
from pmod.modeling.vision import build_vision_tower


# ---------------------------------------------------------------------------------------------- models
def build_dense(preset: Preset, device: str, seed: int = 0, attn_backend: str = "auto") -> PmodForConditionalGeneration:
    """Dense model with random weights built on `device` (decoder on meta first: no full-size CPU copy)."""
    cfg = preset.config()
    with torch.device("meta"):
        model = PmodForConditionalGeneration(cfg, attn_backend=attn_backend)
    model = model.to(preset.dtype).to_empty(device=device)
    torch.manual_seed(seed)
    with torch.device(device):  # the small tower gets transformers' init and real buffers (position ids)
        model.vision_tower = build_vision_tower(cfg.vision).to(preset.dtype)
    return model.init_weights().eval().requires_grad_(False)


def with_routers(dense: PmodForConditionalGeneration, mod: ModConfig, router_std: float, seed: int = 0):
    """A p-MoD model sharing every module of `dense` (no copy), plus routers ~ N(0, router_std), bias 0."""
    cfg = dense.config.replace(mod=mod)
    with torch.device("meta"):
        model = PmodForConditionalGeneration(cfg, attn_backend=dense.attn_backend)
    for name in ("vision_tower", "projector", "lm_head", "image_newline"):
        if hasattr(dense, name):
            setattr(model, name, getattr(dense, name))
    lm, src = model.language_model, dense.language_model
    lm.embed_tokens, lm.layers, lm.norm = src.embed_tokens, src.layers, src.norm
    g = torch.Generator(dense.device).manual_seed(seed)
    C = cfg.text.hidden_size
    routers = {}
    for key in lm.routers:
        r = nn.Linear(C, 1, bias=cfg.mod.router_bias, device=dense.device, dtype=dense.dtype)
        with torch.no_grad():
            r.weight.normal_(0.0, router_std, generator=g)
            if r.bias is not None:
                r.bias.zero_()
        routers[key] = r
    lm.routers = nn.ModuleDict(routers)
    return model.eval().requires_grad_(False)


def hf_llama(dense: PmodForConditionalGeneration):
    """`transformers.LlamaForCausalLM` (SDPA) whose parameters ARE our tensors (`language_model.*` -> `model.*`)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    t = dense.config.text
    cfg = LlamaConfig(
        vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads, head_dim=t.head_dim, rms_norm_eps=t.rms_norm_eps,
        rope_theta=t.rope_theta, max_position_embeddings=t.max_position_embeddings, tie_word_embeddings=False,
        bos_token_id=t.bos_token_id, eos_token_id=t.eos_token_id, pad_token_id=t.pad_token_id,
        attn_implementation="sdpa",
    )
    with torch.device("meta"):
        hf = LlamaForCausalLM(cfg)
    sd = {k.replace("language_model.", "model.", 1): v for k, v in dense.state_dict(keep_vars=True).items()
          if k.startswith("language_model.") and ".routers." not in k}
    sd["lm_head.weight"] = dense.lm_head.weight
    missing, unexpected = hf.load_state_dict(sd, strict=False, assign=True)
    if unexpected or any("rotary" not in k for k in missing):
        raise RuntimeError(f"hf_llama: key map mismatch: missing {missing}, unexpected {unexpected}")
    hf.model.rotary_emb = LlamaRotaryEmbedding(config=cfg).to(dense.device)
    return hf.eval().requires_grad_(False)
