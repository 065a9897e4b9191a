"""The end of a run: the trained model exported where `pmod.from_pretrained` reads it, and the run's config."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from pmod.io.atomic import atomic_write_text, fsync_dir, fsync_file
from pmod.io.files import write_checkpoint

__all__ = ["export_model", "write_run_config"]


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
