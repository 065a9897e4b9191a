"""`train(cfg)`: the accelerate loop behind `pmod train`, one process on a CPU up to DeepSpeed across nodes.

The distributed set-up (DDP, FSDP, DeepSpeed ZeRO-2/3, nodes) comes from `accelerate launch` and its
config file (train/accelerate/*.yaml); mixed precision and gradient accumulation from the run config.
The loop is plain: build -> freeze (strategy) -> data -> optimizer / schedule -> prepare -> resume ->
steps (checkpoint every `save_steps` and at the end) -> export. Everything that decides the result is
a function of (config, seed, world size), so a resumed run repeats an uninterrupted one bit for bit on
a CPU.
"""
from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import yaml
from torch.utils.data import DataLoader

from pmod.training.accel import fill_deepspeed_auto, make_accelerator, zero_stage
from pmod.training.build import build
from pmod.io.atomic import atomic_write_text, check_writable_dir
from pmod.training.checkpoint import (
    TrainerState,
    clean_partial,
    export_model,
    list_checkpoints,
    resume_point,
    save_checkpoint,
    write_run_config,
)
from pmod.training.config import TrainConfig, check_resume_config
from pmod.training.data import Collator, ConversationDataset
from pmod.training.monitor import Monitor
from pmod.training.records import read_records
from pmod.training.sampler import BatchStream, LocalBatches
from pmod.training.schedule import build_scheduler
from pmod.training.step import SKIP_REASONS, train_step
from pmod.peft import get_strategy, trainable_summary
from pmod.training.stages import stage_roles

__all__ = ["train", "TrainResult", "Callback"]


class Callback(Protocol):
    """Optional hooks for Python users (the resume test, the strategy comparison's meter): any may be left out.
    `on_step_begin` runs once the step's batches are loaded, before the strategy's own hook; `on_step_end` after
    the optimizer step and the step's logging. `model` is the unwrapped model, `optimizer` the prepared one."""

    def on_step_begin(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None: ...
    def on_step_end(self, step: int, logs: dict[str, Any] | None) -> None: ...
    def on_save(self, step: int, path: Path) -> None: ...


@dataclass
class TrainResult:
    output: Path
    steps: int
    loss: float | None  # the last logged loss
    exported: Path
    checkpoint: Path | None
    skipped: dict[str, Any] = field(default_factory=dict)


def _call(callbacks: Sequence[Any], hook: str, *args: Any) -> None:
    for cb in callbacks:
        fn = getattr(cb, hook, None)
        if fn is not None:
            fn(*args)


def train(cfg: TrainConfig, callbacks: Sequence[Callback] = ()) -> TrainResult:
    """Train as `cfg` says; returns where the model went. Call under `accelerate launch` for several processes."""
    cfg.check_required()
    accelerator = make_accelerator(cfg)
    from accelerate.utils import set_seed

    if cfg.tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    set_seed(cfg.seed)
    out = check_writable_dir(cfg.output, "--output")
    config_changes = _check_resume_config(cfg, out)  # before anything heavy: a refused resume costs nothing
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        clean_partial(out)
    accelerator.wait_for_everyone()

    built = build(cfg)
    strategy = get_strategy(cfg.strategy, **cfg.strategy_options)
    strategy.check_distributed(str(accelerator.distributed_type), zero_stage(accelerator))
    model = strategy.prepare(built.model, stage_roles(cfg.stage, cfg.train_vision_tower))
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()

    samples, report = read_records(cfg.data, cfg.image_folder, cfg.check_images, cfg.max_samples, cfg.allow_outside_image_folder)
    dataset = ConversationDataset(samples, built.tokenizer, built.processor, built.template, model.config.model_max_length)
    world, gas = accelerator.num_processes, cfg.gradient_accumulation_steps
    stream = BatchStream(dataset.lengths(), dataset.has_image, cfg.per_device_batch_size * world, cfg.seed,
                         cfg.group_by_modality_length, world)
    total = cfg.max_steps or max(1, cfg.num_epochs * stream.per_epoch // gas)

    optimizer = strategy.build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg.lr_scheduler, total, cfg.warmup_ratio, cfg.warmup_steps)
    fill_deepspeed_auto(accelerator, cfg, model.config.text.hidden_size)
    model, optimizer = accelerator.prepare(model, optimizer)
    parts = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "strategy": strategy}  # what a checkpoint holds
    inner = accelerator.unwrap_model(model)

    fingerprint = {"seed": cfg.seed, "global_batch": cfg.per_device_batch_size * world, "gradient_accumulation_steps": gas,
                   "num_samples": len(dataset), "total_steps": total, "stage": cfg.stage, "strategy": cfg.strategy,
                   "group_by_modality_length": cfg.group_by_modality_length}
    state = TrainerState(fingerprint=fingerprint)
    monitor_msgs = []
    if cfg.resume:
        found = resume_point(accelerator, out, cfg.resume, fingerprint, warn=monitor_msgs.append, **parts)
        if found is None:
            monitor_msgs.append(f"--resume: no complete checkpoint in {out / 'checkpoints'}; starting from step 0")
        else:
            path, state = found
            monitor_msgs.append(f"resumed from {path}: step {state.step}, data position {state.position}")
            if config_changes:
                monitor_msgs.append("resumed with changed settings (--allow-config-change): " + "; ".join(config_changes))
    if accelerator.is_main_process:
        _truncate_log(out / "train_log.jsonl", state.step)  # the steps after the checkpoint are redone: logged once

    monitor = Monitor(accelerator, out, total, state.step, cfg.report_to, cfg.to_dict())
    for m in monitor_msgs:
        monitor.write(m)
    _start_report(monitor, accelerator, cfg, built, inner, report, stream, total, out)

    remaining = LocalBatches(stream, accelerator.process_index, state.position, state.position + (total - state.step) * gas)
    loader = DataLoader(dataset, batch_sampler=remaining,
                        collate_fn=Collator(built.tokenizer.pad_token_id, inner.config.image_aspect_ratio in ("anyres", "native")), num_workers=cfg.num_workers,
                        pin_memory=torch.cuda.is_available())
    batches = iter(loader)
    acc = {"loss": 0.0, "targets": 0, "tokens": 0}
    skipped: Counter = Counter(state.skipped if accelerator.is_main_process else {})  # summed over processes when logged
    last_loss, ckpt = None, None
    monitor.tick()
    while state.step < total:
        micro = [next(batches) for _ in range(gas)]
        _call(callbacks, "on_step_begin", state.step, inner, optimizer)
        nxt = state.step + 1  # a checkpoint step is always logged: the counters it saves are then complete
        log_now = nxt % cfg.logging_steps == 0 or nxt % cfg.save_steps == 0 or nxt == total
        res = train_step(accelerator, model, inner, optimizer, scheduler, strategy, micro, state.step, cfg.max_grad_norm, log_now)
        state.step += 1
        state.position += gas
        acc["loss"] += res.loss_sum
        acc["targets"] += res.targets
        acc["tokens"] += res.tokens
        for reason, where in res.skipped:
            if skipped[reason] < 5:
                monitor.write(f"warning: sample skipped at load time ({reason}) {where}; replaced by the next one")
            skipped[reason] += 1
        monitor.step()
        logs = None
        if log_now:
            logs, tokens = _reduce_logs(accelerator, acc, skipped, res, monitor.tick())
            state.tokens += tokens
            state.skipped = logs.pop("_skipped")
            last_loss = logs["loss"]
            monitor.log(state.step, logs)
            acc = {"loss": 0.0, "targets": 0, "tokens": 0}
        _call(callbacks, "on_step_end", state.step, logs)
        if state.step % cfg.save_steps == 0 or state.step == total:
            ckpt = save_checkpoint(accelerator, out, state, cfg.save_total_limit, **parts)
            monitor.write(f"checkpoint {ckpt}")
            _call(callbacks, "on_save", state.step, ckpt)

    exported = export_model(accelerator, model, strategy, built.processor, out, cfg.stage)
    summary = {"before_training": report.to_dict(), "at_load_time": state.skipped}
    if accelerator.is_main_process:
        atomic_write_text(out / "skipped_samples.json", json.dumps(summary, indent=2) + "\n")
    monitor.write(f"done: {state.step} steps, model written to {exported}")
    monitor.close()
    return TrainResult(out, state.step, last_loss, exported, ckpt, summary)


def _check_resume_config(cfg: TrainConfig, out: Path) -> list[str]:
    """A resume must continue the run its folder holds: the given settings are compared with its saved
    train_config.yaml (refused naming each changed field, unless allowed); returns the allowed changes."""
    saved_path = out / "train_config.yaml"
    if not cfg.resume or not saved_path.is_file() or not list_checkpoints(out):
        return []
    try:
        saved = TrainConfig.from_dict(yaml.safe_load(saved_path.read_text()))
    except (yaml.YAMLError, ValueError, TypeError, AttributeError) as e:
        raise ValueError(f"{saved_path}: cannot read the run's saved config ({type(e).__name__}: {e})") from None
    return check_resume_config(saved, cfg, f"in {out}")


def _truncate_log(path: Path, step: int) -> None:
    """Keep train_log.jsonl's lines up to `step` (and drop a line cut short by a kill): after a resume every step
    is logged once."""
    if not path.is_file():
        return
    keep, dropped = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
            if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= step:
                keep.append(line)
                continue
        except ValueError:
            pass
        dropped += 1
    if dropped:
        atomic_write_text(path, "".join(x + "\n" for x in keep))


def _reduce_logs(accelerator, acc: dict[str, Any], skipped: Counter, res, dt: float) -> tuple[dict[str, Any], int]:
    """Sum the counters of all processes (one all-reduce) into the logged values."""
    local = [acc["loss"], acc["targets"], acc["tokens"], *(skipped[r] for r in SKIP_REASONS)]
    tot = accelerator.reduce(torch.tensor(local, dtype=torch.float64, device=accelerator.device), reduction="sum").tolist()
    logs = {"loss": tot[0] / max(tot[1], 1.0), "lr": res.lr, "tokens_per_s": tot[2] / max(dt, 1e-9),
            "targets": int(tot[1])}
    if res.grad_norm is not None:
        logs["grad_norm"] = res.grad_norm
    logs.update(res.routing)
    logs["_skipped"] = {r: int(n) for r, n in zip(SKIP_REASONS, tot[3:]) if n}
    return logs, int(tot[2])


def _start_report(monitor: Monitor, accelerator, cfg: TrainConfig, built, inner, report, stream: BatchStream, total: int,
                  out: Path) -> None:
    if not accelerator.is_main_process:
        return
    write_run_config(out, cfg.to_dict())
    roles = ", ".join(f"{r} {t / 1e6:.2f}M/{n / 1e6:.2f}M" for r, (t, n) in sorted(trainable_summary(inner).items()))
    mod = "dense" if inner.config.is_dense else f"p-MoD, {len(inner.config.mod_ratios)} MoD layers"
    monitor.write(f"model {cfg.model} ({built.source}, {mod}); template {built.template.name}; trainable: {roles}")
    monitor.write(f"data {cfg.data}: {len(stream.lengths)} samples; {report.summary()}")
    monitor.write(f"{accelerator.num_processes} process(es) x {cfg.per_device_batch_size} rows x {cfg.gradient_accumulation_steps} "
                  f"accumulation; {stream.per_epoch} micro-batches per epoch; {total} optimizer steps")
