"""Whole-checkpoint atomic saves: config.json, weight shards and index switch from the old set to the new one
at a single instant, whatever the number of shards before and after.

A save writes every new file into a staging folder inside the target (`DIR/.pmod-save-<id>/`), fsyncs them,
then writes `COMMIT.json` (the new file set and the old files it replaces) there: that rename is the commit.
Only then are the files moved into place one by one (each `os.replace` atomic) and the replaced ones deleted;
last, COMMIT.json and the staging folder go. Before the commit the old checkpoint is untouched; after it, a
reader takes each file of the new set from the staging folder while it is still there, else from `DIR`
(`Pending.path`), so a SIGKILL at any instant leaves the old complete checkpoint or the new complete one.
The next save first finishes (rolls forward) a committed staging folder and deletes an uncommitted one.
Readers never write: `recover` runs only from a writer.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pmod.io.atomic import atomic_write_text, check_writable_dir, clean_temp, fsync_dir, fsync_file

__all__ = ["Pending", "pending_commit", "recover", "commit_folder", "OWN_WEIGHTS", "STAGING_PREFIX"]

STAGING_PREFIX = ".pmod-save-"
COMMIT_NAME = "COMMIT.json"
# The weight files of our layout: a save replaces every one of them that the new set does not hold.
OWN_WEIGHTS = re.compile(r"model\.safetensors|model-\d{5}-of-\d{5}\.safetensors|model\.safetensors\.index\.json")
OWN_FILES = {"config.json", "pmod_processor.json", "mm_projector.safetensors"}  # other files whose temp leftovers are ours


@dataclass
class Pending:
    """A committed save whose files are not all in place yet."""

    folder: Path
    staging: Path
    files: list[str]  # the new file set (config.json, weights, index, ...)
    weights: list[str]  # the weight files among them, in reading order
    stale: list[str]  # old files the new set replaces
    seq: int

    def path(self, name: str) -> Path:
        staged = self.staging / name
        return staged if staged.exists() else self.folder / name


def _read_commit(staging: Path) -> Pending | None:
    try:
        c = json.loads((staging / COMMIT_NAME).read_text())
        return Pending(staging.parent, staging, list(c["files"]), list(c["weights"]), list(c["stale"]), int(c["seq"]))
    except (OSError, ValueError, KeyError, TypeError):  # absent (not committed) or cut short: not a commit
        return None


def _stagings(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.name.startswith(STAGING_PREFIX) and p.is_dir())
    except (FileNotFoundError, NotADirectoryError):
        return []


def pending_commit(folder: str | os.PathLike) -> Pending | None:
    """The newest committed but unfinished save in `folder`, if any (read-only)."""
    found = [p for p in map(_read_commit, _stagings(Path(folder))) if p is not None]
    return max(found, key=lambda p: p.seq) if found else None


def _finish(p: Pending) -> None:
    for name in p.files:
        staged = p.staging / name
        if staged.exists():
            os.replace(staged, p.folder / name)
    fsync_dir(p.folder)
    for name in p.stale:
        if name not in p.files:
            (p.folder / name).unlink(missing_ok=True)
    fsync_dir(p.folder)
    (p.staging / COMMIT_NAME).unlink(missing_ok=True)  # from here on the staging folder is only a leftover
    shutil.rmtree(p.staging, ignore_errors=True)
    fsync_dir(p.folder)


def recover(folder: str | os.PathLike) -> None:
    """Finish committed saves (oldest first), delete uncommitted staging folders and temp files (writers only)."""
    folder = Path(folder)
    commits = sorted((p for p in map(_read_commit, _stagings(folder)) if p is not None), key=lambda p: p.seq)
    for p in commits:
        _finish(p)
    for s in _stagings(folder):
        shutil.rmtree(s, ignore_errors=True)
    clean_temp(folder, lambda target: bool(OWN_WEIGHTS.fullmatch(target)) or target in OWN_FILES)


def commit_folder(folder: str | os.PathLike, write: Callable[[Path], tuple[list[str], list[str]]], what: str = "checkpoint") -> Path:
    """Atomically replace a checkpoint in `folder`. `write(staging)` writes the new files into `staging` and
    returns (all file names, weight file names); our old weight files that the new set lacks are deleted."""
    folder = check_writable_dir(folder, what)
    folder.mkdir(parents=True, exist_ok=True)
    recover(folder)
    staging = folder / f"{STAGING_PREFIX}{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    try:
        files, weights = write(staging)
        for name in files:
            fsync_file(staging / name)
        stale = sorted(p.name for p in folder.iterdir() if OWN_WEIGHTS.fullmatch(p.name) and p.name not in files)
        fsync_dir(staging)
        atomic_write_text(staging / COMMIT_NAME, json.dumps(
            {"files": files, "weights": weights, "stale": stale, "seq": time.time_ns()}, indent=1))
    except BaseException:
        if _read_commit(staging) is None:  # failed before the commit: the old checkpoint stays, untouched
            shutil.rmtree(staging, ignore_errors=True)
        raise
    _finish(_read_commit(staging))
    return folder
