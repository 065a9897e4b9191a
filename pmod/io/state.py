"""Training states (optimizer, scheduler, strategy, RNG) as JSON + safetensors: nothing is ever unpickled.

`save_tree(obj, folder, name)` writes `{name}.json`, a JSON tree in which every tensor is replaced by a reference
into `{name}.safetensors`; `load_tree` reads them back exactly (floats through JSON's shortest round-trip repr,
tensors bit for bit). The tree may hold dicts (any int / str keys), lists, tuples, str, int, float (NaN / Inf
included), bool, None, tensors, numpy arrays and torch dtypes: what optimizer, LR-scheduler, strategy and RNG
states are made of. Anything else is refused when saving, naming where it sits, so a state that cannot be
written safely fails at the first checkpoint, not at resume.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from pmod.io.errors import CheckpointError

__all__ = ["save_tree", "load_tree", "tree_files"]

_T, _ND, _TUP, _MAP, _DT = "__tensor__", "__ndarray__", "__tuple__", "__map__", "__dtype__"


def tree_files(name: str) -> tuple[str, str]:
    return f"{name}.json", f"{name}.safetensors"


def _encode(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous().clone()  # clone: safetensors refuses shared storage
        return {_T: key}
    if isinstance(obj, np.ndarray):
        return {_ND: obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, torch.dtype):
        return {_DT: str(obj).removeprefix("torch.")}
    if isinstance(obj, (bool, str)) or obj is None:
        return obj
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj)
    if isinstance(obj, tuple):
        return {_TUP: [_encode(v, f"{path}[{i}]", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{path}[{i}]", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and not any(k.startswith("__") for k in obj):
            return {k: _encode(v, f"{path}.{k}", tensors) for k, v in obj.items()}
        for k in obj:
            if not isinstance(k, (str, int)) or isinstance(k, bool):
                raise TypeError(f"{path}: key {k!r} ({type(k).__name__}) cannot be saved; use str or int keys")
        return {_MAP: [[k, _encode(v, f"{path}[{k!r}]", tensors)] for k, v in obj.items()]}
    raise TypeError(f"{path} is a {type(obj).__name__}, which a checkpoint cannot hold safely (tensors, numbers, "
                    f"strings, lists, tuples and dicts only)")


def _decode(obj: Any, tensors: dict[str, torch.Tensor], where: Path) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors, where) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if _T in obj:
        if obj[_T] not in tensors:
            raise CheckpointError(f"{where}: refers to tensor {obj[_T]!r}, which its .safetensors file does not hold")
        return tensors[obj[_T]]
    if _ND in obj:
        return np.asarray(obj[_ND], dtype=np.dtype(obj["dtype"]))
    if _DT in obj:
        dt = getattr(torch, str(obj[_DT]), None)
        if not isinstance(dt, torch.dtype):
            raise CheckpointError(f"{where}: unknown dtype {obj[_DT]!r}")
        return dt
    if _TUP in obj:
        return tuple(_decode(v, tensors, where) for v in obj[_TUP])
    if _MAP in obj:
        return {k: _decode(v, tensors, where) for k, v in obj[_MAP]}
    return {k: _decode(v, tensors, where) for k, v in obj.items()}


def save_tree(obj: Any, folder: str | os.PathLike, name: str) -> list[str]:
    """Write `obj` as `{name}.json` (+ `{name}.safetensors` when it holds tensors); returns the file names."""
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(obj, name, tensors)
    js, st = tree_files(name)
    folder = Path(folder)
    (folder / js).write_text(json.dumps({"format": "pmod-state-1", "tree": tree}))
    if not tensors:
        return [js]
    save_file(tensors, str(folder / st), metadata={"format": "pt"})
    return [js, st]


def load_tree(folder: str | os.PathLike, name: str) -> Any:
    """The object `save_tree` wrote; a CheckpointError naming the file when it is missing or corrupt."""
    folder = Path(folder)
    js, st = folder / tree_files(name)[0], folder / tree_files(name)[1]
    try:
        raw = json.loads(js.read_text())
        tree = raw["tree"]
    except FileNotFoundError:
        raise CheckpointError(f"{js}: missing") from None
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{js}: corrupt or truncated ({type(e).__name__}: {e})") from None
    tensors = {}
    if st.exists():
        try:
            # cloned into fresh allocations: views into the file buffer can be misaligned, and vectorised kernels
            # round differently on misaligned tails, which would break bit-exact resume
            tensors = {k: v.clone() for k, v in load_file(str(st)).items()}
        except Exception as e:
            raise CheckpointError(f"{st}: corrupt or truncated ({type(e).__name__}: {e})") from None
    return _decode(tree, tensors, js)
