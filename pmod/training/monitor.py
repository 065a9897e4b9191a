"""What a run reports: a tqdm bar (loss, lr, tokens/s), `train_log.jsonl`, optional trackers, and the
per-layer routing statistics of p-MoD (mean router weight w over vision tokens, kept ratio).

Only the main process writes. Values are reduced across processes by the loop before they get here.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

__all__ = ["routing_stats", "Monitor", "logger"]

logger = logging.getLogger("pmod.training")


@torch.no_grad()
def routing_stats(out) -> dict[str, float]:
    """Per MoD layer: `routing/L{i}/w_mean` (mean w over vision tokens), `routing/L{i}/kept` (kept / vision
    tokens of the micro-batch). Empty when the batch had no image (every layer ran dense)."""
    if not out.routing or out.vision_mask is None:
        return {}
    vis = out.vision_mask  # [B, M] bool
    n_vis = vis.sum().clamp(min=1)
    stats = {}
    for rec in out.routing:
        w = rec.weights.float().to(vis.device)  # [B, M]
        stats[f"routing/L{rec.layer:02d}/w_mean"] = float((w * vis).sum() / n_vis)
        stats[f"routing/L{rec.layer:02d}/kept"] = float(sum(rec.num_kept)) / float(n_vis)
    return stats


class Monitor:
    def __init__(self, accelerator, output: Path, total_steps: int, start_step: int, report_to: list[str], run_config: dict[str, Any]):
        self.main = accelerator.is_main_process
        self.accelerator = accelerator
        self.trackers = bool(report_to)
        self.log_path = Path(output) / "train_log.jsonl"
        self.bar = tqdm(total=total_steps, initial=start_step, disable=not self.main, desc="train", dynamic_ncols=True)
        self._t = time.perf_counter()
        if self.trackers:
            accelerator.init_trackers(run_config.get("run_name") or "pmod", config=_flat(run_config))

    def tick(self) -> float:
        """Seconds since the previous tick."""
        now = time.perf_counter()
        dt, self._t = now - self._t, now
        return dt

    def step(self, n: int = 1) -> None:
        self.bar.update(n)

    def log(self, step: int, logs: dict[str, Any]) -> None:
        if not self.main:
            return
        self.bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}", tok_s=f"{logs['tokens_per_s']:.0f}", refresh=False)
        with open(self.log_path, "a") as f:
            f.write(json.dumps({"step": step, **logs}) + "\n")
        if self.trackers:
            self.accelerator.log(logs, step=step)

    def write(self, msg: str) -> None:
        if self.main:
            tqdm.write(msg)
            logger.info(msg)

    def close(self) -> None:
        self.bar.close()
        if self.trackers:
            self.accelerator.end_training()


def _flat(d: dict[str, Any]) -> dict[str, Any]:
    """Trackers take scalars: nested values become JSON strings."""
    return {k: (v if isinstance(v, (int, float, str, bool)) or v is None else json.dumps(v)) for k, v in d.items()}
