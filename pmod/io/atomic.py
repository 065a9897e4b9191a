"""Crash-safe file writes: a temporary sibling, flushed to disk, then renamed over the target.

`os.replace` is atomic on POSIX and Windows, so a reader (or a process restarted after a SIGKILL) sees
either the old file or the new one, never a half-written one. The directory is fsynced after the rename
so that the rename itself survives a power cut. Temporary names start with `.` and end with `.tmp`;
`clean_temp` removes the leftovers of an interrupted write. Standard library only (no torch import), so
that config modules may use it.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "atomic_write_text", "atomic_write_bytes", "fsync_file", "fsync_dir", "clean_temp",
           "temp_target", "check_writable_dir"]

TMP_SUFFIX = ".tmp"


def fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Persist a directory's entries (renames, unlinks). A no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """`write(tmp_path)` fills a temporary sibling of `path`; it is fsynced and renamed over `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    os.close(fd)
    try:
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda p: Path(p).write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda p: Path(p).write_text(text, encoding="utf-8"))


def temp_target(name: str) -> str | None:
    """The file an `atomic_write` temp name (`.{target}.{8 random chars}.tmp`) was for, or None."""
    if not (name.startswith(".") and name.endswith(TMP_SUFFIX)):
        return None
    parts = name[1 : -len(TMP_SUFFIX)].rsplit(".", 1)
    return parts[0] if len(parts) == 2 and parts[0] else None


def clean_temp(folder: str | os.PathLike, ours: Callable[[str], bool] | None = None) -> list[Path]:
    """Delete the leftovers of interrupted `atomic_write`s in `folder`: every temp file whose target `ours(target)`
    accepts (all temp files when `ours` is None)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    gone = []
    for p in folder.iterdir():
        target = temp_target(p.name)
        if target is None or not p.is_file() or (ours is not None and not ours(target)):
            continue
        try:
            p.unlink()
            gone.append(p)
        except FileNotFoundError:
            pass
    return gone


def check_writable_dir(path: str | os.PathLike, what: str) -> Path:
    """`path` as a folder that can be created or written: refuses a regular file at `path` or at any parent,
    with a message naming it (instead of mkdir's FileExistsError / NotADirectoryError)."""
    path = Path(path)
    for p in [path, *path.parents]:
        if p.exists():
            if not p.is_dir():
                where = "is" if p == path else f"lies under {p}, which is"
                raise NotADirectoryError(f"{what} {path} {where} a regular file, not a folder")
            break
    return path
