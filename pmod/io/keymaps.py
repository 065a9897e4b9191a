"""Declarative checkpoint key maps: ordered (pattern, replacement) rules that fail loudly.

A rule's replacement `None` drops the key (buffers that older checkpoints saved). A key that no
rule matches is an error that lists every such key, never silently ignored. `inverse` rules give, for an
error message, the name a parameter has in the checkpoint file (`model.layers.12.router.router.weight`),
not only ours (`language_model.routers.12.weight`); every candidate is checked by mapping it forward again.
"""
from __future__ import annotations

import re

from pmod.io.errors import CheckpointError, show_names

__all__ = ["KeyMap", "OURS", "OFFICIAL_PMOD", "LLAVA", "LLAVA_HF", "CLIP_TOWER"]


class KeyMap:
    def __init__(self, name: str, rules: list[tuple[str, str | None]], inverse: list[tuple[str, list[str]]] | None = None):
        self.name = name
        self.rules = [(re.compile(p), r) for p, r in rules]
        self.inverse = [(re.compile(p), reps) for p, reps in (inverse or [])]

    def source_names(self, key: str) -> list[str]:
        """Checkpoint names that this map turns into our `key` (most usual first); [] when none is known."""
        out = []
        for pat, reps in self.inverse:
            if pat.fullmatch(key):
                out += [c for c in (pat.sub(r, key) for r in reps) if self.map_key(c) == key and c not in out]
        return out

    def map_key(self, key: str) -> str | None | bool:
        """The new name, None to drop, or False when no rule matches."""
        for pat, rep in self.rules:
            if pat.fullmatch(key):
                return None if rep is None else pat.sub(rep, key)
        return False

    def remap(self, keys) -> dict[str, str]:
        """{source key: target key} for every kept key; raises naming all unmatched keys."""
        out, unknown = {}, []
        for k in keys:
            new = self.map_key(k)
            if new is False:
                unknown.append(k)
            elif new is not None:
                out[k] = new
        if unknown:
            raise CheckpointError(f"{self.name} checkpoint: {len(unknown)} key(s) match no known parameter: {show_names(sorted(unknown))}")
        return out


OURS = KeyMap("pmod", [(r".+", r"\g<0>")], [(r".+", [r"\g<0>"])])

# Official p-MoD (MCG-NJU/p-MoD, config `pmod_llava_llama`), saved with transformers 4.37.
OFFICIAL_PMOD = KeyMap(
    "official p-MoD",
    [
        (r"model\.layers\.(\d+)\.decoder_layer\.self_attn\.rotary_emb\.inv_freq", None),
        (r"model\.layers\.(\d+)\.self_attn\.rotary_emb\.inv_freq", None),
        (r"model\.layers\.(\d+)\.decoder_layer\.(.+)", r"language_model.layers.\1.\2"),
        (r"model\.layers\.(\d+)\.router\.router\.(weight|bias)", r"language_model.routers.\1.\2"),
        (r"model\.layers\.(\d+)\.(.+)", r"language_model.layers.\1.\2"),
        (r"model\.embed_tokens\.weight", "language_model.embed_tokens.weight"),
        (r"model\.norm\.weight", "language_model.norm.weight"),
        (r"lm_head\.weight", "lm_head.weight"),
        (r"model\.mm_projector\.(.+)", r"projector.\1"),
        (r"model\.vision_tower\.vision_tower\.vision_model\.embeddings\.position_ids", None),
        (r"model\.vision_tower\.vision_tower\.vision_model\.(.+)", r"vision_tower.model.\1"),
        (r"model\.image_newline", "image_newline"),
    ],
    [
        (r"language_model\.routers\.(\d+)\.(weight|bias)", [r"model.layers.\1.router.router.\2"]),
        (r"language_model\.layers\.(\d+)\.(.+)", [r"model.layers.\1.decoder_layer.\2", r"model.layers.\1.\2"]),
        (r"language_model\.(embed_tokens|norm)\.weight", [r"model.\1.weight"]),
        (r"lm_head\.weight", [r"lm_head.weight"]),
        (r"projector\.(.+)", [r"model.mm_projector.\1"]),
        (r"vision_tower\.model\.(.+)", [r"model.vision_tower.vision_tower.vision_model.\1"]),
        (r"image_newline", [r"model.image_newline"]),
    ],
)

# A CLIP tower's own checkpoint (CLIPVisionModel or a full CLIPModel), for checkpoints that did not save it.
CLIP_TOWER = KeyMap(
    "CLIP vision tower",
    [
        (r"(?:vision_model\.)?embeddings\.position_ids", None),
        (r"vision_model\.(.+)", r"vision_tower.model.\1"),
        (r"(embeddings|encoder|pre_layrnorm|post_layernorm)\.(.+)", r"vision_tower.model.\1.\2"),  # saved by transformers 5
        (r"(text_model|text_projection|visual_projection|logit_scale)(\..+)?", None),
    ],
    [(r"vision_tower\.model\.(.+)", [r"vision_model.\1", r"\1"])],
)

# Original LLaVA (`llava_llama`, ...): the official p-MoD names without routers.
LLAVA = KeyMap("LLaVA", [(p.pattern, rep) for p, rep in OFFICIAL_PMOD.rules if "router" not in p.pattern and "decoder_layer" not in p.pattern],
               [(p.pattern, reps) for p, reps in OFFICIAL_PMOD.inverse])

# transformers' llava-hf (`llava`, `llava_next`), both the pre-4.52 names (`language_model.model.*`) and the newer
# (`model.language_model.*`).
LLAVA_HF = KeyMap(
    "llava-hf",
    [
        (r"(?:model\.)?language_model\.(?:model\.)?layers\.(\d+)\.self_attn\.rotary_emb\.inv_freq", None),
        (r"(?:model\.)?language_model\.(?:model\.)?(layers\.\d+\..+|embed_tokens\.weight|norm\.weight)", r"language_model.\1"),
        (r"(?:language_model\.)?lm_head\.weight", "lm_head.weight"),
        (r"(?:model\.)?vision_tower\.(?:vision_model\.)?embeddings\.position_ids", None),
        (r"(?:model\.)?vision_tower\.(?:vision_model\.)?(.+)", r"vision_tower.model.\1"),  # transformers 5 drops vision_model
        (r"(?:model\.)?multi_modal_projector\.linear_1\.(weight|bias)", r"projector.0.\1"),
        (r"(?:model\.)?multi_modal_projector\.linear_2\.(weight|bias)", r"projector.2.\1"),
        (r"(?:model\.)?image_newline", "image_newline"),
    ],
    [
        (r"language_model\.(layers\.\d+\..+|embed_tokens\.weight|norm\.weight)", [r"model.language_model.\1", r"language_model.model.\1"]),
        (r"lm_head\.weight", [r"lm_head.weight", r"language_model.lm_head.weight"]),
        (r"vision_tower\.model\.(.+)", [r"model.vision_tower.vision_model.\1", r"vision_tower.vision_model.\1", r"model.vision_tower.\1"]),
        (r"projector\.0\.(weight|bias)", [r"model.multi_modal_projector.linear_1.\1", r"multi_modal_projector.linear_1.\1"]),
        (r"projector\.2\.(weight|bias)", [r"model.multi_modal_projector.linear_2.\1", r"multi_modal_projector.linear_2.\1"]),
        (r"image_newline", [r"model.image_newline", r"image_newline"]),
    ],
)
