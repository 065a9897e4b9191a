"""Weight files on disk: finding a checkpoint folder, reading safetensors or .bin shards, writing shards.

Every failure names the file: a missing folder or weight file, a corrupt or truncated tensor file,
an index that points at shards that are not there. Which weight files are read is decided by one source:
our own layout reads exactly the set its last save committed (the shard index, else `model.safetensors`);
other layouts prefer safetensors (an index, then `model.safetensors`) over `.bin` files, as transformers
does, so a stale `pytorch_model.bin.index.json` never wins over a fresh `model.safetensors`. `.bin` files
are read with `torch.load(weights_only=True)`: tensors only, never code.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pmod.io.commit import commit_folder, pending_commit
from pmod.io.errors import CheckpointError, CheckpointNotFoundError

__all__ = ["resolve_folder", "config_path", "weight_files", "read_tensors", "check_finite", "plan_shards",
           "write_checkpoint", "save_safetensors", "SAFE_INDEX", "BIN_INDEX"]

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_SINGLE = "pytorch_model.bin"


def resolve_folder(name: str, base: Path | None, files: list[str], what: str, local_only: bool | None = None,
                   patterns: list[str] | None = None) -> Path:
    """A local folder (absolute, relative to `base`, or to the cwd) or a hub id found in the local HF cache
    (downloaded only when the hub is reachable, HF_HUB_OFFLINE is unset and `local_only` is not True; only
    the files matching `patterns` then, by default configs, weights and tokenizer files)."""
    candidates = [Path(name)] if base is None else [base / name, Path(name)]
    for c in candidates:
        if c.is_dir():
            return c.resolve()
    for c in candidates:
        if c.exists():
            raise CheckpointNotFoundError(f"{what} {name!r}: {c} is a file, not a folder")
    if looks_like_hub_id(name):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(name, allow_patterns=patterns or ["*.json", "*.safetensors", "*.bin", "*.model", "*.txt"],
                                          local_files_only=bool(local_only)))
        except Exception as e:  # offline without a cached copy, unknown repo, no network
            raise CheckpointNotFoundError(
                f"{what} {name!r}: not a local folder and not available from the Hugging Face cache "
                f"({type(e).__name__}: {e}); download it first or pass a local path"
            ) from None
    raise CheckpointNotFoundError(f"{what} {name!r} not found (looked in {', '.join(str(c) for c in candidates)})")


def looks_like_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and not name.endswith("/")


def config_path(folder: Path) -> Path:
    """config.json of the checkpoint in `folder`: the one of a committed save still being moved into place, if any."""
    pending = pending_commit(folder)
    return pending.path("config.json") if pending is not None and "config.json" in pending.files else folder / "config.json"


def _index_shards(folder: Path, index: Path) -> list[Path]:
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{index}: not a valid shard index ({type(e).__name__}: {e})") from None
    bad = [s for s in shards if not isinstance(s, str) or Path(s).name != s]
    if bad:
        raise CheckpointError(f"{index} names shard(s) outside its folder: {bad[:5]}")
    missing = [s for s in shards if not (folder / s).is_file()]
    if missing:
        raise CheckpointNotFoundError(f"{index} lists shard(s) that are missing: {missing}")
    return [folder / s for s in shards]


def weight_files(folder: Path, layout: str | None = None) -> list[Path]:
    """The checkpoint's weight files. `layout='pmod'` (ours): exactly the set of the last committed save."""
    pending = pending_commit(folder)
    if pending is not None:
        return [pending.path(n) for n in pending.weights]
    for name in (SAFE_INDEX, SAFE_SINGLE) + (() if layout == "pmod" else (BIN_INDEX, BIN_SINGLE)):  # the first found
        if (folder / name).is_file():
            return _index_shards(folder, folder / name) if name.endswith(".index.json") else [folder / name]
    if layout == "pmod":
        raise CheckpointNotFoundError(f"{folder}: no weight files ({SAFE_SINGLE} or {SAFE_INDEX}), as save_pretrained writes them")
    for pattern in ("model*.safetensors", "pytorch_model*.bin"):
        found = sorted(folder.glob(pattern))
        if found:
            return found
    raise CheckpointNotFoundError(f"{folder}: no weight files (model.safetensors, a shard index or pytorch_model*.bin)")


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"{path}: weight file not found") from None
    except (SafetensorError, RuntimeError, OSError, EOFError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read weights, the file is corrupt, truncated or holds more than tensors "
                              f"({type(e).__name__}: {e})") from None
    except Exception as e:  # torch's weights-only unpickler refusing a global, and the like
        raise CheckpointError(f"{path}: refused ({type(e).__name__}: {e}); pmod reads tensors only, never pickled code") from None


def check_finite(name: str, t: torch.Tensor, where: object) -> None:
    """One reduction pass in the tensor's own dtype: min and max propagate NaN and show +-Inf, and cannot
    overflow as a sum could (a float64 sum, tried first, cost 2.5x the cast copy a load makes anyway on bf16;
    this is ~0.05x, BENCHMARKS.md). Only when it fails is the tensor scanned to say how many and where."""
    if not t.is_floating_point() or t.numel() == 0:
        return
    lo, hi = torch.aminmax(t)
    if math.isfinite(float(lo)) and math.isfinite(float(hi)):
        return
    bad = ~torch.isfinite(t)
    n = int(bad.sum())
    first = tuple(int(i) for i in bad.nonzero()[0].tolist()) if n else ()
    raise CheckpointError(f"{where}: tensor {name} holds {n} non-finite value(s) (NaN/Inf), the first at index {first}; "
                          f"the checkpoint is corrupt (pass check_finite=False to load it anyway)")


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """One safetensors file, atomically (temp + fsync + rename)."""
    from pmod.io.atomic import atomic_write

    atomic_write(path, lambda p: save_file(tensors, p, metadata={"format": "pt"}))


def _parse_size(size: str | int) -> int:
    if isinstance(size, int) and not isinstance(size, bool):
        if size < 1:
            raise ValueError(f"max_shard_size must be positive, got {size}")
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    s = str(size).strip().upper()
    try:
        for u, f in sorted(units.items(), key=lambda kv: -len(kv[0])):
            if s.endswith(u):
                n = int(float(s[: -len(u)]) * f)
                break
        else:
            n = int(s)
    except ValueError:
        raise ValueError(f"max_shard_size={size!r}: expected bytes or a size such as '5GB' or '200KB'") from None
    return _parse_size(n)


def plan_shards(state: dict[str, torch.Tensor], max_shard_size: str | int = "5GB") -> list[tuple[str, dict[str, torch.Tensor]]]:
    """(file name, tensors) per shard of at most `max_shard_size` bytes, keys in sorted order."""
    limit = _parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k in sorted(state):
        t = state[k].detach().contiguous().cpu()
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > limit:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += n
    names = [SAFE_SINGLE] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    return list(zip(names, shards))


def write_checkpoint(folder: str | os.PathLike, config: dict, state: dict[str, torch.Tensor], max_shard_size: str | int = "5GB",
                     extra=None) -> list[Path]:
    """config.json + (sharded) safetensors, all switched in one commit (`pmod.io.commit`). `extra(staging)` may
    write more files into the same commit and returns their names. Returns the weight files."""
    shards = plan_shards(state, max_shard_size)

    def write(staging: Path) -> tuple[list[str], list[str]]:
        for name, shard in shards:
            save_file(shard, str(staging / name), metadata={"format": "pt"})
        files = [n for n, _ in shards]
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for _, s in shards for t in s.values())},
                     "weight_map": {k: n for n, s in shards for k in s}}
            (staging / SAFE_INDEX).write_text(json.dumps(index, indent=2))
            files.append(SAFE_INDEX)
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        files.append("config.json")
        files += list(extra(staging)) if extra is not None else []
        return files, [n for n, _ in shards]

    folder = commit_folder(folder, write)
    return [folder / n for n, _ in shards]
