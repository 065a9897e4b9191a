"""One object from (images, text or chat messages) to model inputs, the way the checkpoint was trained.

- images: `pad` (LLaVA-1.5: expand to square on the mean colour, then CLIP), `square` (CLIP resize
  and centre crop) or `anyres` (LLaVA-NeXT crops); any path, bytes or PIL image, loaded safely.
- text: each `<image>` placeholder becomes IMAGE_TOKEN_INDEX (-200), with each text chunk tokenised on
  its own and only the first keeping BOS (LLaVA's `tokenizer_image_token`).
- chat: a question (or a list of messages) rendered with the checkpoint's conversation template.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from pmod.config import PmodConfig
from pmod.multimodal.anyres import anyres_pixel_values
from pmod.multimodal.images import (
    DEFAULT_MAX_ASPECT_RATIO,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_SIDE,
    clip_preprocess,
    load_image,
    pad_pixel_values,
)
from pmod.multimodal.templates import IMAGE_PLACEHOLDER, get_template, render
from pmod.packing import IMAGE_TOKEN_INDEX

__all__ = ["PmodProcessor", "load_processor", "load_tokenizer"]

PROCESSOR_CONFIG = "pmod_processor.json"


class PmodProcessor:
    def __init__(self, tokenizer, config: PmodConfig, template: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_side: int = DEFAULT_MAX_SIDE, max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO, exif_transpose: bool = False):
        """`max_pixels`, `max_side`, `max_aspect_ratio`: images beyond them are refused from their header, before
        decoding. `exif_transpose=True` applies EXIF orientation (off by default, as LLaVA trained without it)."""
        self.tokenizer = tokenizer
        self.config = config
        self.template = get_template(template or config.conv_template)
        self.max_pixels = max_pixels
        self.max_side, self.max_aspect_ratio, self.exif_transpose = max_side, max_aspect_ratio, exif_transpose

    # --- construction ---------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, template: str | None = None, **kwargs) -> "PmodProcessor":
        from pmod.io import load_config
        from pmod.io.files import resolve_folder

        folder = resolve_folder(str(path), None, files=[], what="checkpoint")
        extra = json.loads((folder / PROCESSOR_CONFIG).read_text()) if (folder / PROCESSOR_CONFIG).exists() else {}
        return cls(load_tokenizer(folder), load_config(folder), template=template or extra.get("template"), **kwargs)

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        from pmod.io.atomic import atomic_write_text, check_writable_dir

        check_writable_dir(folder, "processor folder").mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(str(folder))
        atomic_write_text(Path(folder) / PROCESSOR_CONFIG, json.dumps({"template": self.template.name}, indent=2) + "\n")

    # --- images ---------------------------------------------------------------------------------
    def process_images(self, images: Sequence[Any], images_per_sample: Sequence[int] | None = None
                       ) -> tuple[torch.Tensor | list[torch.Tensor], list[tuple[int, int]]]:
        """-> (pixels, sizes): [N, 3, S, S] for pad/square, a list of [1+n_i, 3, S, S] for anyres; sizes (w, h).
        `images_per_sample` (default: one each) matters to LLaVA-OneVision, which tiles only lone images."""
        v, cfg = self.config.vision, self.config
        pil = [load_image(im, max_pixels=self.max_pixels, max_side=self.max_side, max_aspect_ratio=self.max_aspect_ratio,
                          exif_transpose=self.exif_transpose) for im in images]
        sizes = [im.size for im in pil]
        if cfg.image_aspect_ratio == "native":  # Qwen2.5-VL: dynamic resolution, one tensor per image
            from pmod.multimodal.qwen2_5_vl import qwen_pixel_values

            c = v.clip
            return [qwen_pixel_values(im, c.get("patch_size", 14), c.get("spatial_merge_size", 2), c.get("temporal_patch_size", 2),
                                      v.min_pixels or 56 * 56, v.max_pixels or 28 * 28 * 1280, v.image_mean, v.image_std)
                    for im in pil], sizes
        if cfg.anyres_max_crops is not None:
            from pmod.multimodal.onevision import onevision_pixel_values

            tiled = [n == 1 for n in (images_per_sample or [1] * len(pil)) for _ in range(n)]
            if len(tiled) != len(pil):
                raise ValueError(f"images_per_sample={list(images_per_sample)} sums to {len(tiled)}, but {len(pil)} images were given")
            return [onevision_pixel_values(im, cfg.image_grid_pinpoints, v.image_size, v.image_mean, v.image_std, t)
                    for im, t in zip(pil, tiled)], sizes
        if cfg.image_aspect_ratio == "anyres":
            return [anyres_pixel_values(im, cfg.image_grid_pinpoints, v.image_size, v.image_mean, v.image_std) for im in pil], sizes
        if cfg.image_aspect_ratio == "pad":
            pixels = [pad_pixel_values(im, v.image_size, v.image_mean, v.image_std, self.max_pixels) for im in pil]
        else:
            pixels = [clip_preprocess(im, v.image_size, v.image_mean, v.image_std) for im in pil]
        return (torch.stack(pixels) if pixels else torch.zeros(0, 3, v.image_size, v.image_size)), sizes

    # --- text -----------------------------------------------------------------------------------
    def encode(self, prompt: str) -> list[int]:
        """Token ids with IMAGE_TOKEN_INDEX for each `<image>`; BOS only at the very start."""
        chunks = [self.tokenizer(c).input_ids for c in prompt.split(IMAGE_PLACEHOLDER)]
        bos = self.tokenizer.bos_token_id
        ids: list[int] = []
        for i, chunk in enumerate(chunks):
            if i > 0:
                ids.append(IMAGE_TOKEN_INDEX)
                if bos is not None and chunk[:1] == [bos]:
                    chunk = chunk[1:]
            ids.extend(chunk)
        return ids

    def apply_template(self, messages: list[dict[str, str]] | str, add_generation_prompt: bool = True) -> str:
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        return render(self.template, messages, add_generation_prompt=add_generation_prompt)

    def __call__(
        self,
        text: str | list[str] | list[list[dict[str, str]]],
        images: Sequence[Any] | Sequence[Sequence[Any]] | None = None,
        *,
        chat: bool = True,
        padding_side: str = "left",
    ) -> dict[str, Any]:
        """Batch inputs: `input_ids`, `attention_mask` [B, T] (left-padded for generation), `images`,
        `image_sizes`. `text` holds questions (chat=True: rendered with the template; an image is
        placed before the question when it names none) or ready prompts (chat=False)."""
        batch = [text] if isinstance(text, str) or (text and isinstance(text[0], dict)) else list(text)
        imgs = _per_sample_images(images, len(batch))
        prompts = []
        for i, (t, ims) in enumerate(zip(batch, imgs)):
            if chat:
                msgs = [{"role": "user", "content": t}] if isinstance(t, str) else [dict(m) for m in t]
                first_user = next(m for m in msgs if m["role"] == "user")
                if ims and not any(IMAGE_PLACEHOLDER in m["content"] for m in msgs):
                    first_user["content"] = self.template.image_format * len(ims) + first_user["content"]
                t = self.apply_template(msgs)
            n_ph = t.count(IMAGE_PLACEHOLDER)
            if n_ph != len(ims):
                raise ValueError(f"sample {i}: the prompt has {n_ph} {IMAGE_PLACEHOLDER} placeholder(s) but {len(ims)} image(s) were given")
            prompts.append(t)
        ids = [self.encode(p) for p in prompts]
        T = max(map(len, ids))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(ids), T), pad, dtype=torch.long)
        mask = torch.zeros(len(ids), T, dtype=torch.long)
        for b, row in enumerate(ids):
            sl = slice(T - len(row), T) if padding_side == "left" else slice(0, len(row))
            input_ids[b, sl] = torch.tensor(row)
            mask[b, sl] = 1
        flat = [im for ims in imgs for im in ims]
        pixels, sizes = self.process_images(flat, [len(ims) for ims in imgs]) if flat else (None, None)
        return {"input_ids": input_ids, "attention_mask": mask, "images": pixels, "image_sizes": sizes}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        ids = ids.tolist() if torch.is_tensor(ids) else list(ids)
        return self.tokenizer.decode([i for i in ids if i >= 0], skip_special_tokens=skip_special_tokens).strip()

    def batch_decode(self, rows, skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(r, skip_special_tokens) for r in rows]


def load_tokenizer(folder: Path):
    """The folder's tokenizer. The class named in tokenizer_config.json is used directly, so that
    transformers never reads our (non-transformers) config.json to guess it."""
    import transformers

    cfg_path = folder / "tokenizer_config.json"
    cls_name = json.loads(cfg_path.read_text()).get("tokenizer_class") if cfg_path.exists() else None
    cls = getattr(transformers, cls_name, None) if cls_name else None
    try:
        return (cls or transformers.AutoTokenizer).from_pretrained(str(folder))
    except Exception as e:  # missing files, unknown class, corrupt tokenizer.json
        raise FileNotFoundError(f"{folder}: no usable tokenizer ({type(e).__name__}: {e})") from None


def _per_sample_images(images, n: int) -> list[list[Any]]:
    if images is None:
        return [[] for _ in range(n)]
    images = list(images)
    if n == 1 and not (images and isinstance(images[0], (list, tuple))):
        return [images]
    if len(images) != n or not all(isinstance(x, (list, tuple)) for x in images):
        raise ValueError(f"for a batch of {n} prompts pass images as a list of {n} lists (one per prompt)")
    return [list(x) for x in images]


def load_processor(path: str | os.PathLike, **kwargs) -> PmodProcessor:
    """The processor of a checkpoint folder or hub id: its tokenizer, image settings and template."""
    return PmodProcessor.from_pretrained(path, **kwargs)
