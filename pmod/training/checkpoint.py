"""Resumable checkpoints, written atomically and read without unpickling anything (the export at the end of a run is
`pmod.training.export`; RNG and optimizer restore `run_state`; the restricted unpickler `legacy_checkpoint`).

A checkpoint is `output/checkpoints/step-00000040/`: the model (`model.safetensors`), the optimizer, LR
scheduler, strategy, gradient scaler and every process's RNG as JSON + safetensors (`pmod.io.state`), and
`trainer_state.json` (step, data position, counters, the run's fingerprint and the size of every file), written
last. The folder is built as `.tmp-step-*`, fsynced, and renamed into place: a run killed at any instant leaves
either a complete checkpoint or a `.tmp-*` folder that resume ignores and the next run deletes.

Resume takes the newest checkpoint that verifies (every listed file present at its size, the JSON parsing);
a corrupt one is skipped with a warning naming the bad file, and the previous one is used. Nothing in a run
folder is unpickled: a file the checkpoint does not list is refused (naming it), and checkpoints of earlier
pmod versions (accelerate's `optimizer.bin`, `custom_checkpoint_*.pkl`, `random_states_*.pkl`) are read with
`torch.load(weights_only=True)` and an allow-list of numpy's array types, so a planted pickle cannot run.
DeepSpeed and FSDP shard model and optimizer their own way: accelerate writes those parts, and every pickle
they hold is checked by the same restricted unpickler before accelerate loads it.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from pmod.io.atomic import fsync_dir, fsync_file
from pmod.io.errors import CheckpointError
from pmod.io.state import load_tree, save_tree
from pmod.training.export import export_model, write_run_config
from pmod.training.legacy_checkpoint import LEGACY_MODEL_FILES, UnsafeCheckpointError, load_legacy, scan_pickles
from pmod.training.run_state import restore_optimizer_and_schedule, rng_state, set_rng_state

__all__ = ["TrainerState", "list_checkpoints", "latest_checkpoint", "resume_point", "verify_checkpoint",
           "save_checkpoint", "load_checkpoint", "clean_partial", "export_model", "write_run_config",
           "UnsafeCheckpointError", "CHECKPOINTS", "STATE_FILE"]

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
MODEL_FILE = "model.safetensors"
_NAME = re.compile(r"step-(\d{8})")
_OWN_DISTRIBUTED = ("NO", "MULTI_CPU", "MULTI_GPU", "MULTI_XPU", "MULTI_NPU", "MULTI_MLU", "MULTI_SDAA", "MULTI_MUSA",
                    "MULTI_HPU", "MULTI_NEURON")


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps done
    position: int = 0  # global micro-batches consumed
    tokens: int = 0  # merged tokens seen, all ranks
    skipped: dict[str, int] = field(default_factory=dict)  # samples replaced at load time, by reason (rank 0)
    fingerprint: dict[str, Any] = field(default_factory=dict)
    files: dict[str, int] = field(default_factory=dict)  # every other file of the checkpoint and its size in bytes
    format: str = "pmod-1"  # "pmod-1": our own files; "accelerate": DeepSpeed / FSDP parts written by accelerate

    def check_same_run(self, fingerprint: dict[str, Any], where: Path) -> None:
        """Resuming changes nothing that decides the data order or the schedule, or says which."""
        diff = {k: (self.fingerprint.get(k), v) for k, v in fingerprint.items() if self.fingerprint.get(k) != v}
        if diff:
            shown = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"cannot resume from {where}: the run differs ({shown}); use a new --output or the same settings")

    @classmethod
    def read(cls, folder: Path) -> TrainerState:
        path = folder / STATE_FILE
        try:
            raw = json.loads(path.read_text())
            known = {k: raw[k] for k in cls.__dataclass_fields__ if k in raw}
            state = cls(**known)
            if not isinstance(state.step, int) or not isinstance(state.files, dict):
                raise TypeError("step / files have the wrong type")
        except FileNotFoundError:
            raise CheckpointError(f"{path}: missing") from None
        except (ValueError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{path}: corrupt or truncated ({type(e).__name__}: {e})") from None
        if "files" not in raw:
            state.format = "legacy"  # written by pmod before the file list (accelerate's own files)
        return state


def list_checkpoints(output: str | os.PathLike) -> list[Path]:
    """Checkpoints with a trainer_state.json, oldest first (not yet verified: see `find_resume_point`)."""
    root = Path(output) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.fullmatch(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(_NAME.fullmatch(p.name).group(1)))


def latest_checkpoint(output: str | os.PathLike) -> Path | None:
    found = list_checkpoints(output)
    return found[-1] if found else None


def clean_partial(output: str | os.PathLike) -> list[Path]:
    """Delete the `.tmp-*` / `.del-*` leftovers of an interrupted save or prune (main process only). An
    `.old-step-N` whose replacement never arrived is put back first: it is a complete checkpoint."""
    root = Path(output) / CHECKPOINTS
    if not root.is_dir():
        return []
    for old in root.glob(".old-step-*"):
        final = root / old.name.removeprefix(".old-")
        if not final.exists() and (old / STATE_FILE).is_file():
            os.replace(old, final)
    stale = [p for p in root.glob(".*-step-*")]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    fsync_dir(root)
    return stale


def _listing(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != STATE_FILE}


def verify_checkpoint(folder: str | os.PathLike) -> TrainerState:
    """The checkpoint's TrainerState after checking its files: every listed file present at its recorded size,
    no unlisted file (UnsafeCheckpointError), JSON files parsing. A CheckpointError names the first bad file."""
    folder = Path(folder)
    state = TrainerState.read(folder)
    present = _listing(folder)
    if state.format == "legacy":
        if not any(n in present for n in LEGACY_MODEL_FILES):
            raise CheckpointError(f"{folder}: no {MODEL_FILE}")
        return state
    extra = sorted(set(present) - set(state.files))
    if extra:
        raise UnsafeCheckpointError(f"{folder} holds file(s) its trainer_state.json does not list: {extra[:5]}; pmod never "
                                    f"reads unlisted files (nor unpickles anything) from a run folder: remove them, or "
                                    f"resume from another checkpoint")
    for name, size in state.files.items():
        if name not in present:
            raise CheckpointError(f"{folder / name}: missing (the checkpoint lists it)")
        if present[name] != size:
            raise CheckpointError(f"{folder / name}: {present[name]} bytes, the checkpoint recorded {size}: truncated or corrupt")
        if name.endswith(".json"):
            try:
                json.loads((folder / name).read_text())
            except (ValueError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{folder / name}: not valid JSON ({e})") from None
    return state


def resume_point(accelerator, output: str | os.PathLike, resume: str, fingerprint: dict[str, Any], warn=print,
                 **parts) -> tuple[Path, TrainerState] | None:
    """Load the checkpoint `resume` names ("latest": the newest usable one in `output`) into `parts` (model,
    optimizer, scheduler, strategy). With "latest", a checkpoint that is corrupt (a missing or truncated file,
    one that does not parse) is reported through `warn`, naming the file, and the previous one is tried; a full
    load of that one overwrites whatever the bad one had already put in place. An unsafe checkpoint (unlisted
    files, a pickle that is not plain data) or one of another run is an error, never a fallback."""
    explicit = resume != "latest"
    candidates = [Path(resume)] if explicit else list(reversed(list_checkpoints(output)))
    if explicit and not (Path(resume) / STATE_FILE).is_file():
        raise CheckpointError(f"--resume {resume}: not a complete checkpoint (no {STATE_FILE}); complete ones: "
                              f"{[c.name for c in list_checkpoints(output)]}")
    bad = []
    for ckpt in candidates:
        try:
            state = verify_checkpoint(ckpt)
            return ckpt, load_checkpoint(accelerator, ckpt, fingerprint, state=state, **parts)
        except UnsafeCheckpointError:
            raise
        except CheckpointError as e:
            if explicit:
                raise
            warn(f"warning: checkpoint {ckpt.name} is unusable ({e}); falling back to the previous one")
            bad.append(ckpt.name)
    if bad:
        raise CheckpointError(f"no usable checkpoint in {Path(output) / CHECKPOINTS}: {', '.join(bad)} are corrupt; "
                              f"start a new run (another --output) or repair them")
    return None


def _own_format(accelerator) -> bool:
    return str(accelerator.distributed_type).split(".")[-1] in _OWN_DISTRIBUTED


def _model_state(accelerator, model) -> dict[str, torch.Tensor]:
    inner = accelerator.unwrap_model(model)
    state = {k: v.detach().cpu().contiguous() for k, v in inner.state_dict().items()}
    if inner.config.text.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # safetensors stores a tensor once; it is re-tied on load
    return state


def save_checkpoint(accelerator, output: str | os.PathLike, state: TrainerState, limit: int | None, *, model, optimizer,
                    scheduler, strategy) -> Path:
    """Every process calls this (DeepSpeed / FSDP save collectively); the main one writes, renames and prunes."""
    root = Path(output) / CHECKPOINTS
    final = root / f"step-{state.step:08d}"
    tmp = root / f".tmp-step-{state.step:08d}"
    main = accelerator.is_main_process
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    own = _own_format(accelerator)
    if own:
        if main:
            save_file(_model_state(accelerator, model), str(tmp / MODEL_FILE), metadata={"format": "pt"})
            save_tree(optimizer.state_dict(), tmp, "optimizer")
    else:  # DeepSpeed / FSDP: sharded model and optimizer through accelerate, nothing else
        accelerator.save_state(str(tmp), safe_serialization=True)
        if main:
            for p in list(tmp.glob("random_states_*.pkl")) + list(tmp.glob("custom_checkpoint_*.pkl")):
                p.unlink()  # ours are below, as JSON
    save_tree(rng_state(), tmp, f"rng_state_{accelerator.process_index}")
    if main:
        save_tree(scheduler.state_dict(), tmp, "scheduler")
        save_tree(strategy.state_dict(), tmp, "strategy")
        if getattr(accelerator, "scaler", None) is not None:
            save_tree(accelerator.scaler.state_dict(), tmp, "scaler")
    accelerator.wait_for_everyone()
    if main:
        state.files = _listing(tmp)
        state.format = "pmod-1" if own else "accelerate"
        (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=2, sort_keys=True) + "\n")
        for p in tmp.rglob("*"):
            if p.is_file():
                fsync_file(p)
        fsync_dir(tmp)
        old = root / f".old-step-{state.step:08d}"
        if final.exists():  # re-saving a step (resumed from an older checkpoint): swap, then drop the old one
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_dir(root)
        shutil.rmtree(old, ignore_errors=True)
        if limit is not None:
            for p in list_checkpoints(output)[:-limit]:
                gone = root / f".del-{p.name}"  # a prune cut short leaves a .del-* folder, never a half-deleted step
                os.replace(p, gone)
                fsync_dir(root)
                shutil.rmtree(gone, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: str | os.PathLike, fingerprint: dict[str, Any], *, model, optimizer, scheduler,
                    strategy, state: TrainerState | None = None) -> TrainerState:
    """Check the checkpoint belongs to this run, then restore model, optimizer, scheduler, strategy and RNG."""
    p = Path(path)
    state = state or verify_checkpoint(p)
    state.check_same_run(fingerprint, p)
    inner = accelerator.unwrap_model(model)
    if state.format == "legacy":
        load_legacy(accelerator, p, inner, optimizer, scheduler, strategy)
        return state
    if state.format == "pmod-1":
        try:
            sd = load_file(str(p / MODEL_FILE))
        except Exception as e:
            raise CheckpointError(f"{p / MODEL_FILE}: corrupt or truncated ({type(e).__name__}: {e})") from None
        if inner.config.text.tie_word_embeddings:
            sd["lm_head.weight"] = sd["language_model.embed_tokens.weight"]
        try:
            inner.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"{p / MODEL_FILE} does not fit this run's model: {str(e)[:500]}") from None
        opt_state = load_tree(p, "optimizer")
    else:
        scan_pickles(p)
        accelerator.load_state(str(p))  # DeepSpeed / FSDP parts only: nothing else is registered
        opt_state = None
    restore_optimizer_and_schedule(optimizer, scheduler, opt_state, load_tree(p, "scheduler"))
    strategy.load_state_dict(load_tree(p, "strategy"))
    if (p / "scaler.json").exists() and getattr(accelerator, "scaler", None) is not None:
        accelerator.scaler.load_state_dict(load_tree(p, "scaler"))
    rank = accelerator.process_index
    if not (p / f"rng_state_{rank}.json").exists():
        raise CheckpointError(f"{p}: no RNG state for process {rank} (was the run launched with another number of processes?)")
    set_rng_state(load_tree(p, f"rng_state_{rank}"))
    return state


