"""The one exception type for checkpoint loading (its own module, so that key maps and file readers raise it
without importing the loader)."""
from __future__ import annotations

__all__ = ["CheckpointError", "CheckpointNotFoundError", "show_names"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked: missing, corrupt, unsafe or not matching its config.
    A ValueError, so that callers written for the earlier ValueError / KeyError-free API keep working."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint folder, file or hub id that is not there (also a FileNotFoundError)."""

    def __str__(self) -> str:  # OSError's str would show (errno, strerror) for two arguments
        return str(self.args[0]) if self.args else ""


def show_names(items: list[str], n: int = 12) -> str:
    """The first `n` of `items` for an error message, then how many more (every listing error of pmod.io uses it)."""
    more = f" ... and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(items[:n]) + more
