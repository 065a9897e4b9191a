"""Weight files on disk: finding a checkpoint folder, reading safetensors or .bin shards, writing shards.

Every failure names the file: a missing folder or weight file, a corrupt or truncated tensor file,
an index that points at shards that are not there.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

__all__ = ["resolve_folder", "weight_files", "read_tensors", "write_safetensors_sharded"]

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


def resolve_folder(name: str, base: Path | None, files: list[str], what: str) -> Path:
    """A local folder (absolute, relative to `base`, or to the cwd) or a hub id found in the local HF cache
    (downloaded only when the hub is reachable and HF_HUB_OFFLINE is unset)."""
    candidates = [Path(name)] if base is None else [base / name, Path(name)]
    for c in candidates:
        if c.is_dir():
            return c.resolve()
    if name.count("/") == 1 and not name.startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.bin", "*.model", "*.txt"]))
        except Exception as e:  # offline without a cached copy, unknown repo, no network
            raise FileNotFoundError(
                f"{what} {name!r}: not a local folder and not available from the Hugging Face cache "
                f"({type(e).__name__}: {e}); download it first or pass a local path"
            ) from None
    raise FileNotFoundError(f"{what} {name!r} not found (looked in {', '.join(str(c) for c in candidates)})")


def weight_files(folder: Path) -> list[Path]:
    """The checkpoint's weight files, preferring safetensors; follows a shard index and checks it."""
    for index_name in (SAFE_INDEX, BIN_INDEX):
        index = folder / index_name
        if index.exists():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(f"{index}: not a valid shard index ({e})") from None
            missing = [s for s in shards if not (folder / s).exists()]
            if missing:
                raise FileNotFoundError(f"{index} lists shard(s) that are missing: {missing}")
            return [folder / s for s in shards]
    for pattern in ("*.safetensors", "pytorch_model*.bin"):
        found = sorted(folder.glob(pattern))
        if found:
            return found
    raise FileNotFoundError(f"{folder}: no weight files (model.safetensors, a shard index or pytorch_model*.bin)")


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (SafetensorError, RuntimeError, OSError, EOFError, ValueError) as e:
        raise ValueError(f"{path}: cannot read weights, the file is corrupt or truncated ({type(e).__name__}: {e})") from None


def _parse_size(size: str | int) -> int:
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    s = size.strip().upper()
    for u, f in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if s.endswith(u):
            return int(float(s[: -len(u)]) * f)
    return int(s)


def write_safetensors_sharded(state: dict[str, torch.Tensor], folder: Path, max_shard_size: str | int = "5GB") -> list[Path]:
    """Shards of at most `max_shard_size` bytes; each file written to a temp name, then renamed (atomic)."""
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
    names = ["model.safetensors"] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for stale in list(folder.glob("model*.safetensors")) + [folder / SAFE_INDEX]:
        if stale.name not in names and stale.exists():
            stale.unlink()
    for name, shard in zip(names, shards):
        _atomic(folder / name, lambda p, shard=shard: save_file(shard, p, metadata={"format": "pt"}))
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for s in shards for t in s.values())},
                 "weight_map": {k: n for n, s in zip(names, shards) for k in s}}
        _atomic(folder / SAFE_INDEX, lambda p: Path(p).write_text(json.dumps(index, indent=2)))
    return [folder / n for n in names]


def _atomic(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
