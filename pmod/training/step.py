"""One optimizer step: gradient accumulation over micro-batches, with the loss normalised globally.

Why global normalisation: the model's loss is a mean over one micro-batch's supervised tokens. Averaging
such means over micro-batches and processes (what DDP and naive accumulation do) weights a token in a
short-answer micro-batch more than one in a long-answer micro-batch, so "2 processes x batch b" would
not train like "1 process x batch 2b", nor "accumulate 2 x b" like "batch 2b". We count the supervised
targets of the whole optimizer step across all processes first (one tiny all-reduce), then back-propagate
loss_i x n_i / N per micro-batch, so the gradient is exactly that of the mean over every target of the
step, whatever the split. The factors `world` and `gas` undo DDP's gradient averaging and accelerate's
division by the accumulation count.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from pmod.training.monitor import routing_stats

__all__ = ["StepResult", "SKIP_REASONS", "train_step"]

SKIP_REASONS = ("bad_image", "too_long_for_images", "no_target_after_truncation")


@dataclass
class StepResult:
    loss_sum: float  # sum over this process's micro-batches of loss x targets
    targets: int  # this process's supervised targets
    tokens: int  # this process's merged tokens
    grad_norm: float | None
    lr: float  # of the first param group, as used by this step
    routing: dict[str, float] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def _forward(model, b: dict[str, Any], want_routing: bool):
    # input_ids / masks stay on the host: the model lays the batch out there once, then moves it
    return model(input_ids=b["input_ids"], images=b["images"], image_sizes=b["image_sizes"],
                 attention_mask=b["attention_mask"], labels=b["labels"], logits_to_keep="none", output_routing=want_routing)


def train_step(accelerator, model, inner, optimizer, scheduler, strategy, micro: Sequence[dict[str, Any]], step: int,
               max_grad_norm: float, want_routing: bool) -> StepResult:
    """Run the micro-batches of one optimizer step on this process and update the weights."""
    world, gas = accelerator.num_processes, len(micro)
    n_local = sum(b["num_targets"] for b in micro)
    n_global = accelerator.reduce(torch.tensor(float(n_local), device=accelerator.device), reduction="sum").item()
    strategy.on_step_begin(step, inner, optimizer)
    loss_sum = torch.zeros((), dtype=torch.float64)
    routing: dict[str, float] = {}
    for i, b in enumerate(micro):
        last = i == gas - 1
        with accelerator.accumulate(model), strategy.forward_context(inner):
            out = _forward(model, b, want_routing and last)
            accelerator.backward(out.loss * (b["num_targets"] * world * gas / n_global))
        loss_sum += out.loss.detach().double().cpu() * b["num_targets"]
        if want_routing and last and accelerator.is_main_process:
            routing = routing_stats(out)
    if not accelerator.sync_gradients:
        raise RuntimeError(f"gradient accumulation is out of step: {gas} micro-batches did not end on a sync step")
    strategy.after_backward(inner)
    grad_norm = None
    if max_grad_norm > 0:
        norm = accelerator.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_grad_norm)
        grad_norm = None if norm is None else float(norm)
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    if not accelerator.optimizer_step_was_skipped:  # fp16 overflow: keep the lr where it was
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    strategy.after_optimizer_step(step, inner, optimizer)
    return StepResult(loss_sum=float(loss_sum), targets=n_local, tokens=sum(b["num_tokens"] for b in micro),
                      grad_norm=grad_norm, lr=lr, routing=routing, skipped=[s for b in micro for s in b["skipped"]])
