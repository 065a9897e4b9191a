"""lmms-eval's requests as pmod reads them: visuals to images, prompts with their image placeholders, generation
settings, the cut at stop strings, and what decides a response (the journal's key). Pure functions: no model, no
lmms-eval import, so they are testable without either."""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from PIL import Image

from pmod.multimodal.templates import IMAGE_PLACEHOLDER

__all__ = ["canonical", "cli_output_path", "cut_at", "deterministic", "fingerprint", "generation_settings",
           "n_generated", "task_images", "with_placeholders"]

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
_KNOWN_GEN_KWARGS = {"until", "max_new_tokens", "max_gen_toks", "temperature", "top_p", "top_k", "do_sample", "num_beams"}

def task_images(visuals, task: str) -> list:
    """A task's visuals as a flat list of images; None/[] for text-only documents. Videos are refused."""
    flat = []
    for v in visuals or []:
        flat += v if isinstance(v, (list, tuple)) else [v]
    for v in flat:
        if not (isinstance(v, Image.Image) or (isinstance(v, (str, Path)) and Path(v).suffix.lower() in _IMAGE_SUFFIXES)):
            raise ValueError(f"pmod: task {task} gives a {type(v).__name__} visual ({str(v)[:80]!r}); pmod models take images only")
    return flat


def with_placeholders(context: str, n_images: int) -> str:
    if n_images and IMAGE_PLACEHOLDER not in context:
        return (IMAGE_PLACEHOLDER + "\n") * n_images + context
    return context


def generation_settings(gen_kwargs: dict, default_max_new_tokens: int) -> dict:
    """lmms-eval's gen_kwargs -> pmod.generate options (the request's dict is not modified)."""
    unknown = set(gen_kwargs) - _KNOWN_GEN_KWARGS - {"image_aspect_ratio"}  # the latter: a knob of the llava model
    if unknown:
        print(f"pmod: ignoring generation settings {sorted(unknown)}", file=sys.stderr)
    if int(gen_kwargs.get("num_beams") or 1) != 1:
        raise ValueError(f"pmod: num_beams={gen_kwargs['num_beams']} is not supported (greedy or sampling only)")
    until = gen_kwargs.get("until") or []
    until = [until] if isinstance(until, str) else [u for u in until if u]
    temperature = float(gen_kwargs.get("temperature") or 0.0)
    do_sample = bool(gen_kwargs.get("do_sample", False)) or temperature > 0
    return {
        "until": until,
        "max_new_tokens": int(gen_kwargs.get("max_new_tokens") or gen_kwargs.get("max_gen_toks") or default_max_new_tokens),
        "do_sample": do_sample, "temperature": temperature if temperature > 0 else 1.0,
        "top_p": float(gen_kwargs.get("top_p") or 1.0), "top_k": int(gen_kwargs.get("top_k") or 0),
    }


def cut_at(text: str, until: list[str]) -> str:
    for stop in until:
        text = text.split(stop)[0]
    return text.strip()


def n_generated(row: list[int], eos: set[int]) -> int:
    return next((i + 1 for i, t in enumerate(row) if t in eos), len(row))


def canonical(gen_kwargs: dict) -> str:
    return json.dumps(gen_kwargs, sort_keys=True, default=str)


def deterministic(gen_kwargs: dict) -> bool:
    return not gen_kwargs.get("do_sample") and not float(gen_kwargs.get("temperature") or 0) > 0


def fingerprint(pretrained: str, dtype: str, template: str, max_pixels: int) -> dict:
    """What decides a response: the checkpoint (path; its weight files' names, sizes, inodes and nanosecond times,
    which an atomic re-save always changes; config.json's content), dtype, template, image limit."""
    path = Path(pretrained).expanduser()
    files = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")) if path.is_dir() else []
    stamp = [(f.name, f.stat().st_size, f.stat().st_ino, f.stat().st_mtime_ns) for f in files]
    cfg = path / "config.json"
    cfg_hash = hashlib.sha256(cfg.read_bytes()).hexdigest()[:16] if cfg.is_file() else None
    return {"path": str(path.resolve()) if path.exists() else pretrained, "weights": stamp, "config": cfg_hash,
            "dtype": str(dtype), "template": template, "max_pixels": max_pixels}


def cli_output_path() -> Path | None:
    """lmms-eval's --output_path of this process's command line, where the journal goes by default."""
    import argparse

    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--output_path", default=None)
    known, _ = p.parse_known_args(sys.argv[1:])
    return Path(known.output_path) if known.output_path else None
