"""Document hooks of the pmod_synth lmms-eval task: images from a local folder, exact-match scoring.

`data_root` (from the task YAML's lmms_eval_specific_kwargs) is the dataset folder that `image` paths are
relative to; null means ./data next to this file (the YAML's own default `data_files`).
"""
from __future__ import annotations

import re
from pathlib import Path

from PIL import Image

__all__ = ["DEFAULT_ROOT", "normalize", "synth_doc_to_text", "synth_doc_to_visual", "synth_process_results"]

DEFAULT_ROOT = Path(__file__).resolve().parent / "data"


def _root(kwargs: dict | None) -> Path:
    root = (kwargs or {}).get("data_root")
    return Path(root) if root else DEFAULT_ROOT


def synth_doc_to_visual(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> list[Image.Image]:
    path = _root(lmms_eval_specific_kwargs) / doc["image"]
    if not path.is_file():
        raise FileNotFoundError(f"pmod_synth: image {doc['image']!r} of sample {doc['id']!r} not found at {path}; "
                                "data_root must be the folder holding test.jsonl and images/")
    with Image.open(path) as im:
        return [im.convert("RGB")]


def synth_doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    kw = lmms_eval_specific_kwargs or {}
    return f"{kw.get('pre_prompt', '')}{doc['question']}{kw.get('post_prompt', '')}"


def normalize(text: str) -> str:
    """Lower case, letters, digits and single spaces: 'Top left.' == 'top left'."""
    return " ".join(re.sub(r"[^a-z0-9 ]", " ", text.lower()).split())


def synth_process_results(doc: dict, results: list[str]) -> dict[str, float]:
    return {"exact_match": float(normalize(results[0]) == normalize(doc["answer"]))}
