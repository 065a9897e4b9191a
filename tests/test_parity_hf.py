"""Parity with transformers' own Llama and CLIP on the same weights."""
from __future__ import annotations

import torch
from conftest import make_batch, tiny_model
from transformers import CLIPVisionModel, LlamaConfig, LlamaForCausalLM


def hf_llama_from(model) -> LlamaForCausalLM:
    t = model.config.text
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads, rms_norm_eps=t.rms_norm_eps, rope_theta=t.rope_theta,
        max_position_embeddings=t.max_position_embeddings, tie_word_embeddings=False, attn_implementation="eager",
    )).eval()
    sd = {k.replace("language_model.", "model.", 1): v for k, v in model.state_dict().items()
          if k.startswith("language_model.") and ".routers." not in k}
    sd["lm_head.weight"] = model.lm_head.weight
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return hf.double()


def test_all_ratios_one_zero_routers_equals_hf_llama():
    L = 4
    model = tiny_model(layers=L, ratios={i: 1.0 for i in range(L)})
    with torch.no_grad():
        for r in model.language_model.routers.values():
            r.weight.zero_(); r.bias.zero_()
    ids, mask, n_img = make_batch([(5, 1, 7)])
    pixels = torch.randn(n_img, 3, 42, 42)
    with torch.no_grad():
        out = model(input_ids=ids, images=pixels, attention_mask=mask)
        x, layout = model.prepare(ids, pixels, None, mask)
        ref = hf_llama_from(model)(inputs_embeds=x[None].double()).logits[0].float()
    assert len(out.routing) == L and all(r.kept.shape[1] == 9 for r in out.routing)
    torch.testing.assert_close(out.logits[0], ref, rtol=1e-5, atol=1e-5)


def test_text_only_dense_model_equals_hf_llama():
    model = tiny_model(layers=3, schedule="none")
    ids = torch.randint(3, 97, (2, 19))
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        ref = hf_llama_from(model)(input_ids=ids).logits.float()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_vision_path_equals_clip_penultimate_layer():
    model = tiny_model()
    pixels = torch.randn(3, 3, 42, 42)
    hf = CLIPVisionModel(model.vision_tower.model.config).eval()
    hf.load_state_dict(model.vision_tower.model.state_dict())
    with torch.no_grad():
        ref = hf(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        ours = model.vision_tower(pixels)
        feats = model.encode_images(pixels)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(feats, model.projector(ref).flatten(0, 1), rtol=1e-5, atol=1e-6)
