"""Server metrics in Prometheus' text format (no client library): counters the engine adds to, gauges it sets."""
from __future__ import annotations

import threading
import time
from collections import deque

__all__ = ["Metrics"]

OUTCOMES = ("ok", "error", "cancelled", "timeout", "rejected")
RATE_WINDOW_S = 10.0


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests = dict.fromkeys(OUTCOMES, 0)
        self.counters = dict.fromkeys(("prompt_tokens", "prompt_tokens_cached", "generation_tokens", "prefill_flops",
                                       "prefill_flops_dense", "decode_steps", "prefill_batches", "prefill_seconds",
                                       "decode_seconds"), 0.0)
        self.prefix: dict | None = None  # the prefix cache's stats (PrefixStats.as_dict()), when the server has one
        self.gauges = dict.fromkeys(("queue_length", "running_rows", "kv_cache_bytes", "kv_cache_dense_bytes"), 0)
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens generated at that step)

    def outcome(self, kind: str) -> None:
        with self._lock:
            self.requests[kind] += 1

    def add(self, **amounts: float) -> None:
        with self._lock:
            for k, v in amounts.items():
                self.counters[k] += v
            n = int(amounts.get("generation_tokens", 0))
            if n:
                self._recent.append((time.monotonic(), n))

    def set(self, **values: float) -> None:
        with self._lock:
            self.gauges.update(values)

    def set_prefix(self, stats: dict) -> None:
        with self._lock:
            self.prefix = dict(stats)

    def tokens_per_second(self) -> float:
        """Generated tokens per second over the last RATE_WINDOW_S seconds."""
        now = time.monotonic()
        with self._lock:
            while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
                self._recent.popleft()
            return sum(n for _, n in self._recent) / RATE_WINDOW_S

    def render(self, model_name: str) -> str:
        lab = f'model_name="{model_name}"'
        tps = self.tokens_per_second()
        with self._lock:
            c, g = dict(self.counters), dict(self.gauges)
            req = dict(self.requests)
            pc = dict(self.prefix) if self.prefix is not None else None
        lines = ["# HELP pmod_requests_total Chat completion requests by outcome.", "# TYPE pmod_requests_total counter"]
        lines += [f'pmod_requests_total{{{lab},outcome="{k}"}} {v}' for k, v in req.items()]

        def one(name, kind, help_, value):
            v = int(value) if float(value).is_integer() else float(value)  # exact, not :g's 6 digits (byte counts)
            lines.extend([f"# HELP pmod_{name} {help_}", f"# TYPE pmod_{name} {kind}", f"pmod_{name}{{{lab}}} {v}"])

        one("queue_length", "gauge", "Requests waiting for a row of the running batch.", g["queue_length"])
        one("running_rows", "gauge", "Rows in the running decode batch.", g["running_rows"])
        one("prompt_tokens_total", "counter", "Prompt tokens prefilled (image tokens included).", c["prompt_tokens"])
        one("generation_tokens_total", "counter", "Tokens generated.", c["generation_tokens"])
        one("tokens_per_second", "gauge", f"Generated tokens per second over the last {RATE_WINDOW_S:g} s.", tps)
        one("kv_cache_bytes", "gauge", "KV cache bytes held by the running rows (p-MoD: reduced).", g["kv_cache_bytes"])
        one("kv_cache_dense_bytes", "gauge", "KV cache bytes a dense model would hold for the same rows.",
            g["kv_cache_dense_bytes"])
        one("prefill_flops_total", "counter", "Prefill FLOPs (complete convention, decoder + lm_head).", c["prefill_flops"])
        one("prefill_flops_dense_total", "counter", "Prefill FLOPs the dense twin would have spent.",
            c["prefill_flops_dense"])
        one("prefill_flops_saved_total", "counter", "Prefill FLOPs saved by MoD routing vs dense.",
            c["prefill_flops_dense"] - c["prefill_flops"])
        one("decode_steps_total", "counter", "Batched decode steps run.", c["decode_steps"])
        one("prefill_batches_total", "counter", "Packed prefills run (each admits one or more requests).",
            c["prefill_batches"])
        one("prefill_seconds_total", "counter", "Engine time in prefills (model forwards of admitted requests).",
            c["prefill_seconds"])
        one("decode_seconds_total", "counter", "Engine time in decode steps (model forwards).", c["decode_seconds"])
        one("prompt_tokens_cached_total", "counter", "Prompt tokens served from the prefix cache (not prefilled).",
            c["prompt_tokens_cached"])
        if pc is not None:
            one("prefix_cache_hits_total", "counter", "Requests whose image prefix was in the prefix cache.", pc["hits"])
            one("prefix_cache_misses_total", "counter", "Requests with an image prefix not in the prefix cache.",
                pc["misses"])
            one("prefix_cache_evictions_total", "counter", "Prefixes evicted (least recently used first).",
                pc["evictions"])
            one("prefix_cache_entries", "gauge", "Prefixes held.", pc["entries"])
            one("prefix_cache_bytes", "gauge", "KV bytes the prefix cache holds.", pc["bytes"])
            one("prefix_cache_max_bytes", "gauge", "The prefix cache's bound (--prefix-cache-mb).", pc["max_bytes"])
        return "\n".join(lines) + "\n"
