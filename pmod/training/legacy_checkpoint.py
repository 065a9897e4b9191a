"""Reading what pmod did not write as JSON + safetensors, without running a pickle: the pickles accelerate writes for
DeepSpeed / FSDP, and checkpoints of pmod before its own state files (accelerate's `optimizer.bin`,
`custom_checkpoint_*.pkl`, `random_states_*.pkl`). Every one goes through `torch.load(weights_only=True)` with an
allow-list of numpy's array types, so a planted pickle cannot run code."""
from __future__ import annotations

import pickle  # for its UnpicklingError only: nothing here unpickles outside torch's weights-only loader
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from pmod.io.errors import CheckpointError
from pmod.training.run_state import restore_optimizer_and_schedule, set_rng_state

__all__ = ["LEGACY_MODEL_FILES", "UnsafeCheckpointError", "load_legacy", "safe_torch_load", "scan_pickles"]

LEGACY_MODEL_FILES = ("model.safetensors", "pytorch_model.bin")  # accelerate's names for the weights
_PICKLE_SUFFIXES = (".pkl", ".bin", ".pt", ".pth", ".metadata")


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint folder holding something pmod will not read: an unlisted file, or a pickle that is not plain data."""


def safe_torch_load(path: Path) -> Any:
    """torch.load with the weights-only unpickler, plus numpy's array types (RNG states): never runs code."""
    core = getattr(np, "_core", None) or np.core
    safe = [np.ndarray, np.dtype, core.multiarray._reconstruct] + [type(np.dtype(t)) for t in ("uint32", "float64", "int64")]
    try:
        with torch.serialization.safe_globals(safe):
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except pickle.UnpicklingError as e:  # a global outside the allow-list: code, or an object we do not know
        raise UnsafeCheckpointError(f"{path}: refused by the weights-only unpickler ({str(e).splitlines()[0][:300]}); "
                                    f"pmod never unpickles code from a run folder") from None
    except Exception as e:  # a truncated or corrupt archive
        raise CheckpointError(f"{path}: corrupt or truncated ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


def scan_pickles(folder: Path) -> None:
    """Every pickle-format file accelerate / DeepSpeed / FSDP would load must pass the weights-only unpickler."""
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.suffix in _PICKLE_SUFFIXES:
            safe_torch_load(p)


def load_legacy(accelerator, p: Path, inner, optimizer, scheduler, strategy) -> None:
    """A checkpoint of pmod before its own state files: accelerate's layout, read without running any pickle."""
    safetensors, pickled = (p / name for name in LEGACY_MODEL_FILES)
    sd = load_file(str(safetensors)) if safetensors.exists() else safe_torch_load(pickled)
    if inner.config.text.tie_word_embeddings and "lm_head.weight" not in sd:
        sd["lm_head.weight"] = sd["language_model.embed_tokens.weight"]
    inner.load_state_dict(sd, strict=True)
    customs = sorted(p.glob("custom_checkpoint_*.pkl"))
    states = [safe_torch_load(c) for c in customs]  # 0: the scheduler, 1: the strategy (registration order)
    restore_optimizer_and_schedule(optimizer, scheduler, safe_torch_load(p / "optimizer.bin"), states[0])
    if len(states) > 1:
        strategy.load_state_dict(states[1])
    rng = p / f"random_states_{accelerator.process_index}.pkl"
    if rng.exists():
        st = safe_torch_load(rng)
        set_rng_state({"python": st["random_state"], "numpy": st["numpy_random_seed"], "torch": st["torch_manual_seed"],
                       **({"cuda": st["torch_cuda_manual_seed"]} if "torch_cuda_manual_seed" in st else {})})
