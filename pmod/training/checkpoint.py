"""Resumable checkpoints, written atomically, and the final model export.

A checkpoint is `output/checkpoints/step-00000040/`: accelerate's state (model, optimizer, every
process's RNG, the registered scheduler and strategy; sharded the FSDP / DeepSpeed way when those run)
plus `trainer_state.json` (step, data position, counters, the run's fingerprint). It is written to
`.tmp-step-*`, flushed to disk, and renamed into place: a run killed at any instant leaves either a
complete checkpoint or a `.tmp-*` folder that resume ignores and the next run deletes. Resume takes
the highest complete step.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from pmod.io.files import write_checkpoint

__all__ = ["TrainerState", "list_checkpoints", "latest_checkpoint", "save_checkpoint", "load_checkpoint",
           "clean_partial", "export_model", "CHECKPOINTS", "STATE_FILE"]

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"step-(\d{8})")


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps done
    position: int = 0  # global micro-batches consumed
    tokens: int = 0  # merged tokens seen, all ranks
    skipped: dict[str, int] = field(default_factory=dict)  # samples replaced at load time, by reason (rank 0)
    fingerprint: dict[str, Any] = field(default_factory=dict)

    def check_same_run(self, fingerprint: dict[str, Any], where: Path) -> None:
        """Resuming changes nothing that decides the data order or the schedule, or says which."""
        diff = {k: (self.fingerprint.get(k), v) for k, v in fingerprint.items() if self.fingerprint.get(k) != v}
        if diff:
            shown = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"cannot resume from {where}: the run differs ({shown}); use a new --output or the same settings")


def list_checkpoints(output: str | os.PathLike) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(output) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.fullmatch(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(_NAME.fullmatch(p.name).group(1)))


def latest_checkpoint(output: str | os.PathLike) -> Path | None:
    found = list_checkpoints(output)
    return found[-1] if found else None


def clean_partial(output: str | os.PathLike) -> list[Path]:
    """Delete the `.tmp-*` / `.old-*` leftovers of an interrupted save (main process only)."""
    root = Path(output) / CHECKPOINTS
    stale = [p for p in root.glob(".*-step-*")] if root.is_dir() else []
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def _fsync_tree(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(accelerator, output: str | os.PathLike, state: TrainerState, limit: int | None, safe: bool = True) -> Path:
    """Every process calls this (DeepSpeed / FSDP save collectively); the main one renames and prunes."""
    root = Path(output) / CHECKPOINTS
    final = root / f"step-{state.step:08d}"
    tmp = root / f".tmp-step-{state.step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=safe)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=2, sort_keys=True) + "\n")
        _fsync_tree(tmp)
        old = root / f".old-step-{state.step:08d}"
        if final.exists():  # re-saving a step (resumed from an older checkpoint): swap, then drop the old one
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(root)
        shutil.rmtree(old, ignore_errors=True)
        if limit is not None:
            for p in list_checkpoints(output)[:-limit]:
                shutil.rmtree(p, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: str | os.PathLike, fingerprint: dict[str, Any]) -> TrainerState:
    """Check the checkpoint belongs to this run, then restore model, optimizer, scheduler, strategy and RNG."""
    p = Path(path)
    if not (p / STATE_FILE).is_file():
        raise FileNotFoundError(f"{p} is not a complete checkpoint (no {STATE_FILE}); complete ones: "
                                f"{[c.name for c in list_checkpoints(p.parent.parent)]}")
    state = TrainerState(**json.loads((p / STATE_FILE).read_text()))
    state.check_same_run(fingerprint, p)
    accelerator.load_state(str(p))
    return state


def export_model(accelerator, model, strategy, processor, folder: str | os.PathLike, stage: str) -> Path:
    """Fine-tuning: the trained model in pmod's layout (what `pmod.from_pretrained` and `load_processor`
    read). Pre-training: only `mm_projector.safetensors` with LLaVA's key names (`model.mm_projector.*`),
    the projector the fine-tuning stage starts from (`--pretrain-mm-projector`), as LLaVA saves it."""
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
            os.replace(tmp, folder / "mm_projector.safetensors")
        else:
            if inner.config.text.tie_word_embeddings:
                state.pop("lm_head.weight", None)
            write_checkpoint(folder, inner.config.to_dict(), state)
            processor.save_pretrained(folder)
    accelerator.wait_for_everyone()
    return folder / "mm_projector.safetensors" if stage == "pretrain" else folder
