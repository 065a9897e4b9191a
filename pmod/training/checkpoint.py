"""Resumable checkpoints, written atomically and read without unpickling anything, and the final model export.

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
import pickle  # for its UnpicklingError only: nothing here unpickles outside torch's weights-only loader
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from pmod.io.atomic import atomic_write_text, fsync_dir, fsync_file
from pmod.io.errors import CheckpointError
from pmod.io.files import write_checkpoint
from pmod.io.state import load_tree, save_tree

__all__ = ["TrainerState", "list_checkpoints", "latest_checkpoint", "resume_point", "verify_checkpoint",
           "save_checkpoint", "load_checkpoint", "clean_partial", "export_model", "write_run_config",
           "UnsafeCheckpointError", "CHECKPOINTS", "STATE_FILE"]

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
MODEL_FILE = "model.safetensors"
_NAME = re.compile(r"step-(\d{8})")
_PICKLE_SUFFIXES = (".pkl", ".bin", ".pt", ".pth", ".metadata")
_OWN_DISTRIBUTED = ("NO", "MULTI_CPU", "MULTI_GPU", "MULTI_XPU", "MULTI_NPU", "MULTI_MLU", "MULTI_SDAA", "MULTI_MUSA",
                    "MULTI_HPU", "MULTI_NEURON")


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint folder holding something pmod will not read: an unlisted file, or a pickle that is not plain data."""


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
        if not any(n in present for n in (MODEL_FILE, "pytorch_model.bin")):
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


# --- what goes into a checkpoint ----------------------------------------------------------------------------------
def _rng_state() -> dict[str, Any]:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict[str, Any]) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


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
    save_tree(_rng_state(), tmp, f"rng_state_{accelerator.process_index}")
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


# --- reading a checkpoint back ---------------------------------------------------------------------------------------
def _safe_torch_load(path: Path) -> Any:
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


def _restore_optimizer_and_schedule(optimizer, scheduler, opt_state: dict, sched_state: dict) -> None:
    """Moments and step counts from the checkpoint; hyper-parameters (lr, betas, eps, weight decay, the schedule's
    shape) from this run's config, so that a change allowed with --allow-config-change really takes effect. When
    nothing changed, the values are the checkpoint's own, bit for bit."""
    fresh = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    if opt_state is not None:  # None: accelerate (DeepSpeed / FSDP) restored the optimizer in its own format
        if len(opt_state.get("param_groups", [])) != len(fresh):
            raise CheckpointError(f"the checkpoint's optimizer has {len(opt_state.get('param_groups', []))} parameter "
                                  f"group(s), this run {len(fresh)}: not the same strategy / trainable set")
        optimizer.load_state_dict(opt_state)
    for g, f in zip(optimizer.param_groups, fresh):
        g.update(f)
    scheduler.last_epoch = int(sched_state["last_epoch"])
    scheduler._step_count = int(sched_state.get("_step_count", scheduler.last_epoch + 1))
    scheduler.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
    lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for g, lr in zip(optimizer.param_groups, lrs):
        g["lr"] = lr
    scheduler._last_lr = lrs


def _scan_pickles(folder: Path) -> None:
    """Every pickle-format file accelerate / DeepSpeed / FSDP would load must pass the weights-only unpickler."""
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.suffix in _PICKLE_SUFFIXES:
            _safe_torch_load(p)


def load_checkpoint(accelerator, path: str | os.PathLike, fingerprint: dict[str, Any], *, model, optimizer, scheduler,
                    strategy, state: TrainerState | None = None) -> TrainerState:
    """Check the checkpoint belongs to this run, then restore model, optimizer, scheduler, strategy and RNG."""
    p = Path(path)
    state = state or verify_checkpoint(p)
    state.check_same_run(fingerprint, p)
    inner = accelerator.unwrap_model(model)
    if state.format == "legacy":
        _load_legacy(accelerator, p, inner, optimizer, scheduler, strategy)
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
        _scan_pickles(p)
        accelerator.load_state(str(p))  # DeepSpeed / FSDP parts only: nothing else is registered
        opt_state = None
    _restore_optimizer_and_schedule(optimizer, scheduler, opt_state, load_tree(p, "scheduler"))
    strategy.load_state_dict(load_tree(p, "strategy"))
    if (p / "scaler.json").exists() and getattr(accelerator, "scaler", None) is not None:
        accelerator.scaler.load_state_dict(load_tree(p, "scaler"))
    rank = accelerator.process_index
    if not (p / f"rng_state_{rank}.json").exists():
        raise CheckpointError(f"{p}: no RNG state for process {rank} (was the run launched with another number of processes?)")
    _set_rng_state(load_tree(p, f"rng_state_{rank}"))
    return state


def _load_legacy(accelerator, p: Path, inner, optimizer, scheduler, strategy) -> None:
    """A checkpoint of pmod before its own state files: accelerate's layout, read without running any pickle."""
    if (p / MODEL_FILE).exists():
        sd = load_file(str(p / MODEL_FILE))
    else:
        sd = _safe_torch_load(p / "pytorch_model.bin")
    if inner.config.text.tie_word_embeddings and "lm_head.weight" not in sd:
        sd["lm_head.weight"] = sd["language_model.embed_tokens.weight"]
    inner.load_state_dict(sd, strict=True)
    customs = sorted(p.glob("custom_checkpoint_*.pkl"))
    states = [_safe_torch_load(c) for c in customs]  # 0: the scheduler, 1: the strategy (registration order)
    _restore_optimizer_and_schedule(optimizer, scheduler, _safe_torch_load(p / "optimizer.bin"), states[0])
    if len(states) > 1:
        strategy.load_state_dict(states[1])
    rng = p / f"random_states_{accelerator.process_index}.pkl"
    if rng.exists():
        st = _safe_torch_load(rng)
        _set_rng_state({"python": st["random_state"], "numpy": st["numpy_random_seed"], "torch": st["torch_manual_seed"],
                        **({"cuda": st["torch_cuda_manual_seed"]} if "torch_cuda_manual_seed" in st else {})})


def export_model(accelerator, model, strategy, processor, folder: str | os.PathLike, stage: str) -> Path:
    """Fine-tuning: the trained model in pmod's layout (what `pmod.from_pretrained` and `load_processor`
    read), config, weights and processor files switched in one atomic commit. Pre-training: only
    `mm_projector.safetensors` with LLaVA's key names (`model.mm_projector.*`), the projector the fine-tuning
    stage starts from (`--pretrain-mm-projector`), as LLaVA saves it."""
    folder = Path(folder)
    state = accelerator.get_state_dict(model)  # gathers FSDP / ZeRO-3 shards onto the main process
    if accelerator.is_main_process:
        inner = accelerator.unwrap_model(model)
        folder.mkdir(parents=True, exist_ok=True)
        state = strategy.export(inner, {k: v.detach().cpu() for k, v in state.items()}, folder)
        if stage == "pretrain":
            proj = {f"model.mm_projector.{k.removeprefix('projector.')}": v.contiguous() for k, v in state.items()
                    if k.startswith("projector.")}
            tmp = folder / ".mm_projector.safetensors.tmp"
            save_file(proj, str(tmp), metadata={"format": "pt"})
            fsync_file(tmp)
            os.replace(tmp, folder / "mm_projector.safetensors")
            fsync_dir(folder)
        else:
            if inner.config.text.tie_word_embeddings:
                state.pop("lm_head.weight", None)

            def processor_files(staging: Path) -> list[str]:  # tokenizer + pmod_processor.json, in the same commit
                before = set(os.listdir(staging))
                processor.save_pretrained(staging)
                return sorted(set(os.listdir(staging)) - before)

            write_checkpoint(folder, inner.config.to_dict(), state, extra=processor_files)
    accelerator.wait_for_everyone()
    return folder / "mm_projector.safetensors" if stage == "pretrain" else folder


def write_run_config(output: Path, cfg_dict: dict[str, Any]) -> None:
    """train_config.yaml, atomically (what `--resume` with only `--output` reads back)."""
    import yaml

    atomic_write_text(output / "train_config.yaml", yaml.safe_dump(cfg_dict, sort_keys=True))
