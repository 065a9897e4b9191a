"""The lazy conversation dataset and its collator.

Samples are tokenised and their images decoded only when a batch asks for them (`__getitem__`), so a
665K-sample JSON costs a parse and a stat per image up front, not a pass over the images. A sample
that turns out broken only then (an image that does not decode, a conversation too long for its
images, no answer left after truncation) is replaced by the next sample in the file, deterministically,
and the replacement is reported through the batch (`skipped`) so the loop can count it: every rank
keeps the same number of rows, which DDP needs, and nothing is dropped silently.

Legend: B rows, T longest row (text tokens, one -200 per image), S image side.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

from pmod.config import PmodConfig
from pmod.multimodal.images import ImageLoadError
from pmod.multimodal.templates import Template, segments
from pmod.multimodal.tokens import image_token_count
from pmod.packing import IGNORE_INDEX
from pmod.training.labels import count_targets, tokenize_segments, truncate
from pmod.training.records import Sample

__all__ = ["ConversationDataset", "Collator", "image_feature_tokens"]

MAX_REPLACEMENTS = 100


def image_feature_tokens(config: PmodConfig, size_wh: tuple[int, int]) -> int:  # LLaVA-1.5 / NeXT; see image_token_count
    """Feature tokens the model will insert for one image of this size (what `truncate` must budget)."""
    v = config.vision
    if config.image_aspect_ratio != "anyres":
        return v.num_patches
    from pmod.multimodal.anyres import anyres_num_tokens

    return anyres_num_tokens(size_wh, config.image_grid_pinpoints, v.image_size, v.image_size // v.patch_size, config.mm_patch_merge_type)


class ConversationDataset(Dataset):
    """Map-style dataset over checked `Sample`s; items are dicts ready for `Collator`."""

    def __init__(self, samples: list[Sample], tokenizer, processor, template: Template, max_length: int):
        self.samples = samples
        self.tokenizer = tokenizer
        self.processor = processor  # PmodProcessor: only its image pipeline is used
        self.template = template
        self.max_length = max_length

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def has_image(self) -> list[bool]:
        return [bool(s.images) for s in self.samples]

    def lengths(self) -> list[int]:
        """Estimated merged length per sample, for grouping (words + image tokens; LLaVA's estimate)."""
        per_image = self.processor.config.vision.num_patches
        return [s.words + per_image * len(s.images) for s in self.samples]

    def _build(self, s: Sample) -> dict[str, Any]:
        pixels, sizes = self.processor.process_images(s.images, [len(s.images)]) if s.images else (None, [])
        tok = tokenize_segments(self.tokenizer, segments(self.template, s.messages))
        widths = [image_token_count(self.processor.config, px, sz) for px, sz in zip(pixels, sizes)] if s.images else []
        cut = truncate(tok, widths, self.max_length)
        if cut is None:
            raise _Unusable("too_long_for_images", f"its image(s) do not fit in model_max_length={self.max_length}")
        n = count_targets(cut.labels)
        if n == 0:
            raise _Unusable("no_target_after_truncation", f"no answer token left within model_max_length={self.max_length}")
        merged = len(cut.input_ids) - len(widths) + sum(widths)
        return {"input_ids": cut.input_ids, "labels": cut.labels, "pixels": pixels, "image_sizes": sizes,
                "num_targets": n, "num_tokens": merged}

    def __getitem__(self, i: int) -> dict[str, Any]:
        skipped: list[tuple[str, str]] = []
        for k in range(MAX_REPLACEMENTS):
            s = self.samples[(i + k) % len(self.samples)]
            try:
                item = self._build(s)
            except _Unusable as e:
                skipped.append((e.reason, f"#{s.index} id={s.id}: {e}"))
                continue
            except (ImageLoadError, OSError) as e:
                skipped.append(("bad_image", f"#{s.index} id={s.id}: {e}"))
                continue
            item["skipped"] = skipped
            return item
        raise RuntimeError(f"{MAX_REPLACEMENTS} consecutive samples from #{i} are unusable, e.g. {skipped[:3]}; check the data")


class _Unusable(ValueError):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


@dataclass
class Collator:
    """Right-pads rows (training convention), stacks or lists the images, and counts what the loop needs."""

    pad_token_id: int
    anyres: bool

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        T = max(len(it["input_ids"]) for it in items)
        B = len(items)
        input_ids = torch.full((B, T), self.pad_token_id, dtype=torch.long)  # [B, T]
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)  # [B, T]
        mask = torch.zeros(B, T, dtype=torch.long)  # [B, T]
        for b, it in enumerate(items):
            n = len(it["input_ids"])
            input_ids[b, :n] = torch.tensor(it["input_ids"])
            labels[b, :n] = torch.tensor(it["labels"])
            mask[b, :n] = 1
        pix = [it["pixels"] for it in items if it["pixels"] is not None]
        if not pix:
            images = None
        elif self.anyres:
            images = [crops for p in pix for crops in p]  # list of [1+n_i, 3, S, S]
        else:
            images = torch.cat(pix)  # [N, 3, S, S]
        sizes = [sz for it in items for sz in it["image_sizes"]]
        return {
            "input_ids": input_ids, "attention_mask": mask, "labels": labels, "images": images,
            "image_sizes": sizes or None,
            "num_targets": sum(it["num_targets"] for it in items),
            "num_tokens": sum(it["num_tokens"] for it in items),
            "skipped": [s for it in items for s in it["skipped"]],
        }
