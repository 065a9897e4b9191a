"""The serving engine: one thread owns the model and runs continuous batching over the reduced KV cache.

Each step, at the boundary between two decode steps: rows that finished, were cancelled or timed out leave (their
cache rows dropped); waiting requests are prefilled together (one packed forward; with a prefix cache, those whose
image prefix is stored continue a copy of it instead: `pmod.serve.admit`) and their rows appended to the running
cache (`PmodCache.insert_rows`); then one decode step runs for every row, whatever its length. Per-row
sampling settings and generators make each answer what `model.generate` gives that request alone.
An exception is charged to the request that raised it (a failed packed prefill is retried row by row); the engine
goes on with the next step. Legend: B running rows, V vocab.
"""
from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from pmod.prefix_cache import PrefixCache
from pmod.sampling import sample_next
from pmod.serve.admit import admit
from pmod.serve.metrics import Metrics
from pmod.serve.text import AnswerText
from pmod.serve.usage import kv_usage

__all__ = ["Engine", "Job", "QueueFull"]

_ids = itertools.count()


class QueueFull(Exception):
    pass


@dataclass(eq=False)
class Job:
    """One request, as the engine runs it. `emit(event)` is called from the engine thread with dicts:
    {"type": "delta", "text"}, {"type": "done", "finish_reason", "text", "usage", "routing"},
    {"type": "error", "status", "message"}."""

    inputs: dict  # one row: input_ids [1, T], attention_mask [1, T], images, image_sizes
    prompt_tokens: int
    max_tokens: int
    emit: Callable[[dict], None]
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    routing: bool = False
    ignore_eos: bool = False
    timeout_s: float = 600.0
    id: int = field(default_factory=lambda: next(_ids))
    cancelled: bool = False  # set by the server when the client goes away; read at step boundaries
    submitted: float = field(default_factory=time.monotonic)
    # engine-side state
    generated: int = 0
    last: int = 0
    text: AnswerText | None = None
    generator: torch.Generator | None = None
    efficiency: dict = field(default_factory=dict)
    routing_out: dict | None = None
    prefix: tuple[str, int] | None = None  # (prefix-cache key, input ids in the prefix), when the prompt has one
    cached_tokens: int = 0  # prompt tokens served from the prefix cache

    def cancel(self) -> None:
        self.cancelled = True

    @property
    def expired(self) -> bool:
        return time.monotonic() - self.submitted > self.timeout_s


class Engine:
    def __init__(self, model, processor, max_batch: int = 32, max_queue: int = 256, metrics: Metrics | None = None,
                 prefix_cache_bytes: int = 0):
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch} and {max_queue}")
        self.model, self.processor = model, processor
        self.prefixes = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes > 0 else None  # image prefixes, LRU
        self.max_batch, self.max_queue = max_batch, max_queue
        self.metrics = metrics or Metrics()
        t = model.config.text
        self.eos = set(t.eos_token_ids)
        self.pad_id = t.pad_token_id if t.pad_token_id is not None else 0
        self._pending: deque[Job] = deque()
        self._cv = threading.Condition()
        self._rows: list[Job] = []  # the running batch, in cache row order
        self._cache = None
        self._thread: threading.Thread | None = None
        self._closing = False
        self.error: BaseException | None = None  # what killed the loop, if anything did

    # --- the public side (any thread) ------------------------------------------------------------
    def submit(self, job: Job) -> None:
        """Queue `job`; QueueFull when `max_queue` requests already wait."""
        with self._cv:
            if len(self._pending) >= self.max_queue:
                self.metrics.outcome("rejected")
                raise QueueFull(f"{len(self._pending)} requests are waiting (--max-queue {self.max_queue})")
            self._pending.append(job)
            self.metrics.set(queue_length=len(self._pending))
            self._cv.notify()

    def start(self) -> Engine:
        self._thread = threading.Thread(target=self._loop, name="pmod-engine", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        with self._cv:
            self._closing = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        try:
            while True:
                with self._cv:
                    while not (self._pending or self._rows or self._closing):
                        self._cv.wait()
                    if self._closing:
                        break
                self.step()
        except BaseException as e:
            self.error = e
            raise
        finally:
            for job in list(self._rows) + list(self._pending):
                self._fail(job, 503, "the server is shutting down")

    # --- one step (the engine thread; tests drive it directly) -----------------------------------
    @torch.inference_mode()
    def step(self) -> None:
        self._reap()
        self._admit()
        if self._rows:
            try:
                self._decode()
            except Exception as e:  # noqa: BLE001 -- not attributable to one row: every running row fails
                for job in self._rows:
                    self._fail(job, 500, f"decode failed: {type(e).__name__}: {e}")
                self._rows, self._cache = [], None
        self._gauges()

    def _reap(self) -> None:
        gone = [i for i, j in enumerate(self._rows) if j.cancelled or j.expired]
        for i in gone:
            self._drop_reason(self._rows[i])
        self._remove(gone)

    def _drop_reason(self, job: Job) -> None:
        if job.cancelled:
            self.metrics.outcome("cancelled")
        else:
            self._fail(job, 504, f"the request timed out after {job.timeout_s:g} s", outcome="timeout")

    def _admit(self) -> None:
        jobs: list[Job] = []
        with self._cv:
            while self._pending and len(self._rows) + len(jobs) < self.max_batch:
                job = self._pending.popleft()
                if job.cancelled or job.expired:
                    self._drop_reason(job)
                else:
                    jobs.append(job)
            self.metrics.set(queue_length=len(self._pending))
        if not jobs:
            return
        try:
            self._join(jobs)
        except Exception as e:  # noqa: BLE001 -- find the request that raised: each alone
            if len(jobs) == 1:
                self._fail(jobs[0], 400 if isinstance(e, ValueError) else 500, f"{type(e).__name__}: {e}")
                return
            for job in jobs:
                try:
                    self._join([job])
                except Exception as e1:  # noqa: BLE001
                    self._fail(job, 400 if isinstance(e1, ValueError) else 500, f"{type(e1).__name__}: {e1}")

    def _join(self, jobs: list[Job]) -> None:
        """Prefill `jobs` (`admit`: packed, or continuing stored prefixes); their first tokens; the unfinished rows
        join the running cache."""
        t0 = time.perf_counter()
        parts = admit(self.model, jobs, self.pad_id, self.prefixes)
        self.metrics.add(prefill_seconds=time.perf_counter() - t0)
        if self.prefixes is not None:
            self.metrics.set_prefix(self.prefixes.stats().as_dict())
        for part in parts:
            self.metrics.add(prefill_batches=1)
            for job in part.jobs:
                job.text = AnswerText(self.processor.decode, job.stop)
                if job.seed is not None:
                    job.generator = torch.Generator(device=self.model.device).manual_seed(job.seed % 2**64)
                eff = job.efficiency
                self.metrics.add(prompt_tokens=job.prompt_tokens, prompt_tokens_cached=job.cached_tokens,
                                 prefill_flops=eff["prefill_tflops"] * 1e12,
                                 prefill_flops_dense=eff["prefill_tflops_dense"] * 1e12)
            cache = part.cache
            done = self._advance(part.jobs, part.logits, cache)
            keep = [j for i, j in enumerate(part.jobs) if i not in done]
            if not keep:
                continue
            if done:
                cache.drop_rows(done)
            if self._cache is None or not self._rows:
                self._cache = cache
            else:
                self._cache.insert_rows(cache)
            self._rows += keep

    def _decode(self) -> None:
        t0 = time.perf_counter()
        tokens = torch.tensor([j.last for j in self._rows], device=self.model.device)  # [B]
        logits = self.model.decode_step(tokens, self._cache)  # [B, V]
        self.metrics.add(decode_steps=1, decode_seconds=time.perf_counter() - t0)
        self._remove(self._advance(self._rows, logits, self._cache))

    def _advance(self, jobs: list[Job], logits: torch.Tensor, cache) -> list[int]:
        """Choose each row's next token, send its text; returns the rows that finished (their events sent)."""
        greedy = logits.argmax(-1)  # [B]
        if any(j.temperature != 0 for j in jobs):  # per-row samplers; all greedy: the argmax as it is (no B slices)
            greedy = torch.cat([greedy[i : i + 1] if j.temperature == 0 else
                                sample_next(logits[i : i + 1], True, j.temperature, j.top_k, j.top_p, j.generator)
                                for i, j in enumerate(jobs)])
        finite = torch.isfinite(logits).all(-1).long()
        toks, ok = torch.stack([greedy, finite]).tolist()  # the step's one host sync
        self.metrics.add(generation_tokens=len(jobs))
        done = []
        for i, (job, tok) in enumerate(zip(jobs, toks)):
            job.generated += 1
            if not ok:
                self._fail(job, 500, f"non-finite logits (NaN/Inf) at generation step {job.generated - 1}")
                done.append(i)
                continue
            reason = "stop" if tok in self.eos and not job.ignore_eos else None
            if reason is None:
                delta = job.text.add(tok)
                if delta:
                    self._emit(job, {"type": "delta", "text": delta})
                reason = "stop" if job.text.stopped else ("length" if job.generated >= job.max_tokens else None)
            if reason is None:
                job.last = tok
                continue
            self._finish(job, reason, cache, i)
            done.append(i)
        return done

    def _finish(self, job: Job, reason: str, cache, row: int) -> None:
        rest = job.text.finish()
        if rest:
            self._emit(job, {"type": "delta", "text": rest})
        kv, kv_dense = kv_usage(cache, row)
        pm = {**job.efficiency, "kv_bytes": kv, "kv_bytes_dense": kv_dense}
        usage = {"prompt_tokens": job.prompt_tokens, "completion_tokens": job.generated,
                 "total_tokens": job.prompt_tokens + job.generated,
                 "prompt_tokens_details": {"cached_tokens": job.cached_tokens}, "pmod": pm}
        self.metrics.outcome("ok")
        self._emit(job, {"type": "done", "finish_reason": reason, "text": job.text.text, "usage": usage,
                         "routing": job.routing_out})

    def _fail(self, job: Job, status: int, message: str, outcome: str = "error") -> None:
        self.metrics.outcome(outcome)
        self._emit(job, {"type": "error", "status": status, "message": message})

    def _emit(self, job: Job, event: dict) -> None:
        try:
            job.emit(event)
        except Exception:  # noqa: BLE001 -- a listener that is gone (its event loop closed) is no engine fault
            job.cancel()

    def _remove(self, rows: list[int]) -> None:
        if not rows:
            return
        self._cache.drop_rows(rows)
        gone = set(rows)
        self._rows = [j for i, j in enumerate(self._rows) if i not in gone]
        if not self._rows:
            self._cache = None
        elif self._cache.allocated_nbytes() > 2 * self._cache.nbytes() + 2**20:  # long rows left: give memory back
            self._cache.compact(spare=16)

    def _gauges(self) -> None:
        kv = dense = 0
        if self._cache is not None:  # one host read of the positions, not one per row
            c = self._cache
            kv = c.nbytes()
            dense = sum(c.positions.tolist()) * sum(c.token_nbytes(i) for i in range(c.num_layers) if c.k[i] is not None)
        self.metrics.set(running_rows=len(self._rows), kv_cache_bytes=kv, kv_cache_dense_bytes=dense)
