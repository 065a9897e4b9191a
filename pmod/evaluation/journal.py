"""The evaluation journal: one JSON line per request, append-safe, each line checked before it is trusted.

The lmms-eval plugin writes a line per request (its cost and its response) and serves finished deterministic
requests from earlier lines when an interrupted run starts again; `pmod.evaluation.run` averages the costs.
A line is trusted only if it parses, has the fields and types of a record, carries the digest of its own
content (a line edited by hand, cut short by a kill or written by an older pmod fails it), and belongs to the
model being evaluated (its `model_hash`: path, weight files and config of the checkpoint, dtype, template,
image limits). Anything else is dropped with a warning saying how many lines and why, and recomputed.
Writes are one `write()` per batch on a file opened with O_APPEND and fsynced: a kill leaves at most one torn
last line, which the next reader drops. Standard library only: lmms-eval loads this module's caller lazily.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from pmod.evaluation import JOURNAL_GLOB

__all__ = ["Journal", "read_records", "digest", "model_hash", "JOURNAL_GLOB"]

_REQUIRED = {"key": str, "model_hash": str, "digest": str, "deterministic": bool}


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def digest(record: dict) -> str:
    """sha256 of a record's content (every field but the digest itself)."""
    return hashlib.sha256(_canonical({k: v for k, v in record.items() if k != "digest"}).encode()).hexdigest()


def model_hash(fingerprint: dict) -> str:
    return hashlib.sha256(_canonical(fingerprint).encode()).hexdigest()[:32]


def _problem(rec: Any) -> str | None:
    """Why a parsed line cannot be trusted, or None."""
    if not isinstance(rec, dict):
        return "not a JSON object"
    for name, kind in _REQUIRED.items():
        if not isinstance(rec.get(name), kind):
            return f"no valid '{name}' field"
    if rec["digest"] != digest(rec):
        return "its digest does not match its content (edited, cut short or corrupt)"
    resp = rec.get("response")
    if rec.get("reqtype") == "loglikelihood":
        ok = isinstance(resp, list) and len(resp) == 2 and isinstance(resp[0], (int, float)) and isinstance(resp[1], bool)
    else:
        ok = resp is None or isinstance(resp, str)
    return None if ok else "its response has the wrong type"


def read_records(folder: str | os.PathLike, model: str | None = None, warn=None) -> tuple[list[dict], Counter]:
    """Every trusted record of the journals in `folder` (all ranks), and the count of dropped lines by reason.
    With `model` (a model_hash), records of other models are left out silently (they are not wrong, only not ours)."""
    recs, dropped = [], Counter()
    for f in sorted(Path(folder).glob(JOURNAL_GLOB)):
        text = f.read_text(encoding="utf-8", errors="replace")
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                dropped[f"{f.name}: malformed JSON"] += 1
                continue
            why = _problem(rec)
            if why is not None:
                dropped[f"{f.name}: {why}"] += 1
                continue
            if model is None or rec["model_hash"] == model:
                recs.append(rec)
    if dropped and warn is not None:
        warn("pmod: dropped " + "; ".join(f"{n} line(s) of {why}" for why, n in dropped.items())
             + " from the evaluation journal; those requests are recomputed")
    return recs, dropped


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


class Journal:
    """Append-only JSON lines, one per request; earlier trusted lines of this model (any rank) serve as a resume
    cache by request key."""

    def __init__(self, folder: Path | None, rank: int, resume: bool, model: str, warn=_stderr):
        self.path = None if folder is None else Path(folder) / f"pmod_requests.rank{rank}.jsonl"
        self.model = model
        self.done: dict[str, Any] = {}
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume:
            recs, _ = read_records(self.path.parent, model, warn)
            for rec in recs:
                if rec["deterministic"] and rec.get("response") is not None:
                    self.done[rec["key"]] = rec["response"]

    def seal(self, record: dict) -> dict:
        """The record with this journal's model hash and its own digest."""
        rec = {**record, "model_hash": self.model}
        rec["digest"] = digest(rec)
        return rec

    def write(self, records: list[dict]) -> None:
        if self.path is None or not records:
            return
        payload = "".join(json.dumps(self.seal(r), default=str) + "\n" for r in records).encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size:  # a line cut short by an interruption: start on a fresh line
                with open(self.path, "rb") as f:
                    f.seek(size - 1)
                    if f.read(1) != b"\n":
                        payload = b"\n" + payload
            view = memoryview(payload)
            while view:  # one write per batch (appended whole with O_APPEND); loop only on a short write
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
