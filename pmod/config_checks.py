"""Field checks shared by every config dataclass (`pmod.config`, `pmod.training.config`): each error names the
field and the bad value, before anything is built."""
from __future__ import annotations

import dataclasses
import math
from typing import Any

__all__ = ["from_fields"]


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _check_ints(owner: str, obj: Any, names: tuple[str, ...], minimum: int = 1, optional: bool = False) -> None:
    """Each field an int (not a bool, not a string) >= minimum; the message names the field and the value."""
    for name in names:
        v = getattr(obj, name)
        if v is None and optional:
            continue
        _check(_is_int(v), f"{owner}: {name} must be an integer, got {v!r} ({type(v).__name__})")
        _check(v >= minimum, f"{owner}: {name} must be >= {minimum}, got {v}")


def _check_reals(owner: str, obj: Any, names: tuple[str, ...], positive: bool = False) -> None:
    for name in names:
        v = getattr(obj, name)
        _check(_is_real(v), f"{owner}: {name} must be a finite number, got {v!r} ({type(v).__name__})")
        _check(not positive or v > 0, f"{owner}: {name} must be positive, got {v}")


def from_fields(cls: type, d: Any, owner: str, where: str | None = None) -> Any:
    """A config dataclass from a mapping, naming unknown fields (instead of a TypeError from __init__): the one
    strict `from_dict` of every config (PmodConfig and its parts, TrainConfig)."""
    _check(isinstance(d, dict), f"{owner}: {where or 'the config'} must be a mapping of fields, got {type(d).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    prefix = f"{where}." if where else ""
    _check(not unknown, f"{owner}: unknown field(s) {[prefix + k for k in unknown]}; {cls.__name__} has {sorted(known)}")
    return cls(**d)
