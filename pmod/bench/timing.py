"""Wall time, peak memory and the machine's state: interleaved repetitions, CUDA events, /proc readings."""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import gc
import platform
import re
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


# ---------------------------------------------------------------------------------------------- timing
@dataclass
class Timing:
    """Wall times of one callable in ms and its peak memory above the pre-call level (bytes, max over reps)."""

    times_ms: list[float] = field(default_factory=list)
    peak_bytes: int | None = None
    result: Any = None  # the last repetition's return value

    @property
    def median_ms(self) -> float:
        return _median(self.times_ms)

    @property
    def min_ms(self) -> float:
        return min(self.times_ms)

    def summary(self) -> dict:
        return {"median_ms": self.median_ms, "min_ms": self.min_ms, "times_ms": self.times_ms,
                "peak_bytes": self.peak_bytes}


def _median(xs: Sequence[float]) -> float:
    s = sorted(xs)
    return (s[(len(s) - 1) // 2] + s[len(s) // 2]) / 2


def _mem_start(device: str) -> int | None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM, the peak resident set size
        return _status_kib("VmRSS")
    except OSError:
        return None


def _mem_peak(device: str, base: int | None) -> int | None:
    if base is None:
        return None
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() - base
    return _status_kib("VmHWM") - base


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return 1024 * int(re.search(rf"{key}:\s+(\d+)", f.read()).group(1))


def _time_once(fn: Callable[[], Any], device: str) -> tuple[float, Any]:
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        out = fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end), out
    t0 = time.perf_counter()
    out = fn()
    return (time.perf_counter() - t0) * 1e3, out


_TICK: contextvars.ContextVar[Callable[[], None] | None] = contextvars.ContextVar("pmod_bench_tick", default=None)


@contextlib.contextmanager
def ticking(tick: Callable[[], None]):
    """Within the block, `time_interleaved` calls `tick()` after every call it makes (a section's progress bar)."""
    token = _TICK.set(tick)
    try:
        yield
    finally:
        _TICK.reset(token)


def _tick() -> None:
    tick = _TICK.get()
    if tick is not None:
        tick()


def time_interleaved(fns: dict[str, Callable[[], Any]], device: str, warmup: int, reps: int) -> dict[str, Timing]:
    """Time every callable `reps` times, interleaved (a, b, c, a, b, c, ...), after `warmup` rounds.

    The garbage collector runs once before and is off while timing (as in `timeit`); the previous result of a
    callable is dropped before its next call. Each call, warm-up included, ticks the progress (`ticking`), outside
    the timed bracket."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
            _tick()
    out = {name: Timing() for name in fns}
    gc.collect()
    gc.disable()
    try:
        for _ in range(reps):
            for name, fn in fns.items():
                out[name].result = None
                base = _mem_start(device)
                ms, res = _time_once(fn, device)
                peak = _mem_peak(device, base)
                _tick()
                out[name].times_ms.append(ms)
                out[name].result = res
                if peak is not None:
                    out[name].peak_bytes = max(peak, out[name].peak_bytes or 0)
    finally:
        gc.enable()
    return out




def machine_info(device: str) -> dict:
    """CPU model, core count, GPU, library versions, date and commit, for the record."""
    import os

    import transformers

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                                check=False, cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    gpu = torch.cuda.get_device_name() if device.startswith("cuda") else None
    load = _loadavg()
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "gpu": gpu, "device_name": gpu or f"CPU ({cpu})",
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "commit": commit, "loadavg_start": load}


def _cpu_seconds() -> tuple[float, float] | None:
    """(CPU seconds busy on the whole machine, CPU seconds of this process), from /proc/stat and os.times."""
    import os

    try:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return None
    busy = sum(vals) - vals[3] - (vals[4] if len(vals) > 4 else 0)  # all but idle and iowait
    own = os.times()
    return busy / os.sysconf("SC_CLK_TCK"), own.user + own.system


def _others_share(c0, c1, wall: float) -> float | None:
    """Share of all cores' time that other processes used: a CPU timing is clean only when this is ~0."""
    import os

    if c0 is None or c1 is None or wall <= 0:
        return None
    return round(max(0.0, (c1[0] - c0[0]) - (c1[1] - c0[1])) / (wall * (os.cpu_count() or 1)), 3)


def _loadavg() -> list[float] | None:
    """1/5/15-minute load averages: a CPU run is only meaningful when load <= threads (others share the cores)."""
    try:
        with open("/proc/loadavg") as f:
            return [float(x) for x in f.read().split()[:3]]
    except OSError:
        return None
