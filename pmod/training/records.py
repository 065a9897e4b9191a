"""Reading the LLaVA conversation format and setting aside broken samples, with a report.

A record is `{"id", "image": "a.jpg" | ["a.jpg", ...] (optional), "conversations": [{"from":
"human"|"gpt"|"system", "value": ...}, ...]}` in a JSON list or in JSON lines. Everything that can be
checked without decoding an image is checked here, once, before training: structure, roles, the
number of `<image>` placeholders against the number of images, and (optionally) that each image file
exists. A broken record is skipped and counted by reason, never silently; the report is logged and
written next to the checkpoints.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pmod.multimodal.templates import IMAGE_PLACEHOLDER

__all__ = ["Sample", "SkipReport", "read_records", "parse_record"]

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass
class Sample:
    """A checked record: chat messages (roles user/assistant/system) and resolved image paths."""

    index: int  # position in the data file (line number - 1 for JSON lines)
    id: str
    messages: list[dict[str, str]]
    images: list[str]
    words: int  # for length grouping, as LLaVA estimates it


@dataclass
class SkipReport:
    """Counts of skipped samples by reason, with the first few examples of each."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    keep_examples: int = 5

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] += 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < self.keep_examples:
            ex.append(where)

    def merge(self, other: SkipReport) -> None:
        for reason, n in other.counts.items():
            self.counts[reason] += n
            for ex in other.examples.get(reason, []):
                if len(self.examples.setdefault(reason, [])) < self.keep_examples:
                    self.examples[reason].append(ex)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.total:
            return "no samples skipped"
        parts = [f"{n} {reason} (e.g. {'; '.join(self.examples.get(reason, [])[:2])})" for reason, n in self.counts.most_common()]
        return f"{self.total} sample(s) skipped: " + ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {"total": self.total, "counts": dict(self.counts), "examples": self.examples}


class _Broken(ValueError):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def _normalise_placeholders(messages: list[dict[str, str]], n_images: int) -> None:
    """LLaVA's convention: with one image, the placeholder goes first in its message, then a newline;
    with none written in the data, it is added to the first user message."""
    written = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)
    first_user = next(m for m in messages if m["role"] == "user")
    if n_images and written == 0:
        first_user["content"] = (IMAGE_PLACEHOLDER + "\n") * n_images + first_user["content"]
    elif written != n_images:
        raise _Broken("image_placeholder_mismatch", f"{written} {IMAGE_PLACEHOLDER} placeholder(s) for {n_images} image(s)")
    elif n_images == 1:
        for m in messages:
            if IMAGE_PLACEHOLDER in m["content"]:
                m["content"] = (IMAGE_PLACEHOLDER + "\n" + m["content"].replace(IMAGE_PLACEHOLDER, "").strip()).strip()


def _inside(folder: str, name: str) -> str | None:
    """`name` joined to `folder` if it stays inside it (lexically: no absolute path, no `..` climbing out), else
    None. Symbolic links inside the folder are followed as usual (data folders are often links to a disk)."""
    if os.path.isabs(name) or os.path.splitdrive(name)[0]:
        return None
    joined = os.path.normpath(os.path.join(folder, name))
    base = os.path.normpath(folder)
    return joined if joined == base or joined.startswith(base.rstrip(os.sep) + os.sep) else None


def parse_record(rec: Any, index: int, image_folder: str | None, check_images: bool = True,
                 allow_outside: bool = False) -> Sample:
    """A checked Sample, or `_Broken(reason)` naming the field that is wrong. With an image folder, image paths
    must stay inside it (`../x.png` and absolute paths are refused) unless `allow_outside`."""
    if not isinstance(rec, dict):
        raise _Broken("bad_record", f"expected an object, got {type(rec).__name__}")
    turns = rec.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise _Broken("bad_record", "field 'conversations': missing or not a non-empty list")
    messages = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict):
            raise _Broken("bad_record", f"conversations[{i}]: expected {{'from': human|gpt|system, 'value': str}}, got {str(t)[:80]!r}")
        if t.get("from") not in ROLES:
            raise _Broken("bad_record", f"conversations[{i}].from = {t.get('from')!r}; expected one of {sorted(ROLES)}")
        if not isinstance(t.get("value"), str):
            raise _Broken("bad_record", f"conversations[{i}].value must be a string, got {type(t.get('value')).__name__}")
        messages.append({"role": ROLES[t["from"]], "content": t["value"]})
    while True:  # LLaVA drops leading assistant turns
        first = next((i for i, m in enumerate(messages) if m["role"] != "system"), None)
        if first is None or messages[first]["role"] == "user":
            break
        del messages[first]
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise _Broken("no_answer", "no assistant answer to train on")
    image = rec.get("image")
    images = [] if image is None else ([image] if isinstance(image, str) else image)
    if not isinstance(images, list) or not all(isinstance(x, str) and x for x in images):
        raise _Broken("bad_record", f"field 'image' must be a file name or a list of them, got {str(image)[:80]!r}")
    if image_folder and not allow_outside:
        outside = [(j, x) for j, x in enumerate(images) if _inside(image_folder, x) is None]
        if outside:
            j, x = outside[0]
            raise _Broken("image_outside_folder", f"image[{j}] = {x!r} lies outside --image-folder {image_folder}; "
                                                  f"pass --allow-outside-image-folder to read it")
    paths = [os.path.join(image_folder, x) if image_folder else x for x in images]
    if check_images:
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise _Broken("missing_image", f"image file(s) not found: {missing[:3]}")
    _normalise_placeholders(messages, len(paths))
    words = sum(len(m["content"].split()) for m in messages)
    return Sample(index=index, id=str(rec.get("id", index)), messages=messages, images=paths, words=words)


def _raw_records(path: Path) -> list[tuple[int, Any, str | None]]:
    """(index, record or None, error) for every record; a JSON list must parse as a whole."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl" or (not text.lstrip().startswith("[")):
        out = []
        for i, line in enumerate(text.splitlines()):
            if not line.strip():
                continue
            try:
                out.append((i, json.loads(line), None))
            except json.JSONDecodeError as e:
                out.append((i, None, f"line {i + 1}: {e.msg}"))
        return out
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    return [(i, r, None) for i, r in enumerate(data)]


def read_records(path: str | os.PathLike, image_folder: str | None, check_images: bool = True,
                 max_samples: int | None = None, allow_outside: bool = False) -> tuple[list[Sample], SkipReport]:
    """All usable samples of a data file and the report of those skipped."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"training data {p} not found")
    if image_folder is not None and not Path(image_folder).is_dir():
        raise FileNotFoundError(f"image folder {image_folder} not found")
    samples, report = [], SkipReport()
    for index, rec, err in _raw_records(p):
        if max_samples is not None and len(samples) >= max_samples:
            break
        rid = rec.get("id", index) if isinstance(rec, dict) else index
        if err is not None:
            report.add("bad_json", f"{p.name} {err}")
            continue
        try:
            samples.append(parse_record(rec, index, image_folder, check_images, allow_outside))
        except _Broken as e:
            report.add(e.reason, f"#{index} id={rid}: {e}")
    if not samples:
        raise ValueError(f"{p}: no usable samples ({report.summary()})")
    return samples, report
