"""Hardening of evaluation (issue 16): a journal line is trusted only if it is whole, unedited and of the model
being evaluated (a tampered answer changed a score, a malformed line crashed the run, a stale one was served
after the checkpoint was re-saved); `pmod eval` with a missing checkpoint answers at once."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer

pytest.importorskip("lmms_eval", reason="the eval extra (pip install -e .[eval]) is not installed")

from PIL import Image  # noqa: E402

from pmod.evaluation.run import read_journal  # noqa: E402
from pmod.multimodal.processor import PmodProcessor  # noqa: E402


@pytest.fixture
def ckpt(tmp_path):
    folder = tmp_path / "ckpt"
    m = tiny_model(layers=4)
    m.save_pretrained(folder)
    PmodProcessor(tiny_tokenizer(), m.config).save_pretrained(folder)
    return folder


DOCS = [{"question": q, "pil": Image.new("RGB", (42, 42), c)} for q, c in
        (("what color is this ?", (200, 10, 10)), ("is this red ?", (10, 200, 10)), ("how many ?", (10, 10, 200)),
         ("what shape is this ?", (90, 90, 90)))]


def _plugin(ckpt: Path, log: Path):
    from pmod.evaluation.lmms_plugin import PmodLmms

    lm = PmodLmms(pretrained=str(ckpt), dtype="float32", device="cpu", batch_size=2, log=str(log), resume=True)
    lm.task_dict = {"t": {"test": DOCS}}
    return lm


def _requests():
    from lmms_eval.api.instance import Instance

    gk = {"until": ["?"], "max_new_tokens": 5, "temperature": 0, "do_sample": False}
    return [Instance(request_type="generate_until", arguments=(d["question"], dict(gk), lambda d: [d["pil"]], i, "t", "test"),
                     idx=0, metadata={"task": "t", "doc_id": i, "repeats": 1}) for i, d in enumerate(DOCS)]


def _answers(lm) -> list[str]:
    return [r if isinstance(r, str) else r.text for r in lm.generate_until(_requests())]


def _journal(log: Path) -> Path:
    return log / "pmod_requests.rank0.jsonl"


def _lines(log: Path) -> list[dict]:
    return [json.loads(x) for x in _journal(log).read_text().splitlines() if x.strip()]


def _count_generated(monkeypatch, lm) -> list[int]:
    calls = []
    real = lm._generate
    monkeypatch.setattr(lm, "_generate", lambda batch: calls.append(len(batch)) or real(batch))
    return calls


def test_a_tampered_journal_line_is_dropped_and_recomputed(ckpt, tmp_path, monkeypatch, capfd):
    log = tmp_path / "log"
    first = _answers(_plugin(ckpt, log))
    lines = _lines(log)
    lines[1]["response"] = "TAMPERED"  # the key still matches the request
    _journal(log).write_text("".join(json.dumps(r) + "\n" for r in lines))
    lm = _plugin(ckpt, log)
    calls = _count_generated(monkeypatch, lm)
    assert _answers(lm) == first
    assert sum(calls) == 1  # only the tampered request was recomputed
    err = capfd.readouterr().err
    assert "dropped 1 line(s)" in err and "digest does not match" in err


def test_malformed_journal_lines_are_dropped_with_a_warning_not_a_crash(ckpt, tmp_path, monkeypatch, capfd):
    log = tmp_path / "log"
    first = _answers(_plugin(ckpt, log))
    with open(_journal(log), "a") as f:
        f.write("[1, 2]\n{\"deterministic\": true, \"response\": \"x\"}\nnot json at all\n{\"key\": 3}\n{\"cut sh")
    lm = _plugin(ckpt, log)
    calls = _count_generated(monkeypatch, lm)
    assert _answers(lm) == first and sum(calls) == 0  # the good lines still serve
    err = capfd.readouterr().err
    assert "dropped" in err and "malformed JSON" in err and "not a JSON object" in err
    recs = read_journal(log)  # the table's reader does not crash either
    assert len(recs) == len(DOCS)


def test_a_stale_line_is_not_served_after_the_checkpoint_is_re_saved(ckpt, tmp_path, monkeypatch):
    """Re-saving other weights of the same size within the same second left the old fingerprint (name, size, whole
    seconds) unchanged; a journal line of the old weights must not answer for the new ones."""
    log = tmp_path / "log"
    _answers(_plugin(ckpt, log))
    f = ckpt / "model.safetensors"
    st = f.stat()
    tiny_model(layers=4, seed=5).save_pretrained(ckpt)  # same config, same size, other weights
    assert f.stat().st_size == st.st_size
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    lm = _plugin(ckpt, log)
    calls = _count_generated(monkeypatch, lm)
    _answers(lm)
    assert sum(calls) == len(DOCS)  # everything recomputed for the new weights


def test_journal_writes_append_whole_lines_after_a_cut(ckpt, tmp_path):
    log = tmp_path / "log"
    _answers(_plugin(ckpt, log))
    text = _journal(log).read_text()
    _journal(log).write_text(text + text.splitlines()[0][:30])  # a line cut short by a kill
    lm = _plugin(ckpt, log)
    lm.journal.write([{"key": "k", "deterministic": True, "response": "r"}])
    last = _journal(log).read_text().splitlines()[-1]
    assert json.loads(last)["key"] == "k"  # started on its own line


def test_pmod_eval_with_a_missing_model_answers_at_once(tmp_path, monkeypatch, capsys, ckpt):
    from pmod.cli import main

    def no_subprocess(*a, **k):
        raise AssertionError("lmms-eval was started for a checkpoint that does not exist")

    monkeypatch.setattr(subprocess, "Popen", no_subprocess)
    assert main(["eval", "--model", str(tmp_path / "nope"), "--tasks", "pmod_synth", "--output", str(tmp_path / "o")]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["eval", "--model", "runs/missing", "--tasks", "pmod_synth", "--output", str(tmp_path / "o")]) == 2
    assert "runs/missing" in capsys.readouterr().err
    assert main(["eval", "--model", str(ckpt), "--compare", str(tmp_path), "--tasks", "pmod_synth",
                 "--output", str(tmp_path / "o")]) == 2
    assert "no config.json" in capsys.readouterr().err
