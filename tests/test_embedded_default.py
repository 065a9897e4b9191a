"""The embedded default: the shipped checkpoints drive `pmod demo`, and the script that made them runs."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

import pmod
from pmod.cli import main
from pmod.evaluation.synth_vqa import DENSE_CKPT, PMOD_CKPT

REPO = Path(__file__).resolve().parents[1]


def test_shipped_checkpoints_are_a_pmod_model_and_its_dense_twin():
    pm, dense = pmod.load_config(PMOD_CKPT), pmod.load_config(DENSE_CKPT)
    assert pm.mod.schedule == "shiftedcos" and dense.mod.schedule == "none"
    assert pm.vision.num_patches >= 256  # vision tokens dominate the sequence
    assert pm.replace(mod=dense.mod).to_dict() == dense.to_dict()  # same architecture otherwise
    for ckpt in (PMOD_CKPT, DENSE_CKPT):
        assert (ckpt / "model.safetensors").stat().st_size < 16 * 2**20


def _run_in_terminal(argv: list[str], cols: int = 120, timeout: float = 600) -> str:
    """Run a command under a pseudo-terminal `cols` wide (as a user's shell would) and return what it wrote."""
    import fcntl
    import os
    import pty
    import select
    import struct
    import termios
    import time

    pid, fd = pty.fork()
    if pid == 0:  # the child: exec at once
        os.execv(sys.executable, [sys.executable, *argv])
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, cols, 0, 0))
    out, end = b"", time.monotonic() + timeout
    while time.monotonic() < end:
        if select.select([fd], [], [], 1)[0]:
            try:
                data = os.read(fd, 65536)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            out += data
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, out.decode(errors="replace")[-3000:]
    return out.decode("utf-8", errors="replace")


def test_demo_on_the_shipped_checkpoints(tmp_path):
    """`pmod demo` in a terminal: progress bars vanish before any line is printed (each line, as the terminal shows
    it, is whole), the fresh answers of both models are marked right or wrong, the routing map names its question
    and both answers."""
    out = tmp_path / "demo"
    raw = _run_in_terminal(["-m", "pmod.cli", "demo", "--output", str(out), "--n-test", "24", "--fresh", "3",
                            "--focus-samples", "4", "--seed", "5", "--captions", "8"])
    shown = [seg.rstrip("\r").split("\r")[-1] for seg in raw.split("\n")]  # what each terminal row ends up showing
    assert not [s for s in shown if "%|" in s or "batch/s" in s], shown
    assert "p-MoD reaches" in raw and "Routing map saved" in raw
    assert sum(s.startswith("      truth ") and s.count("✓") + s.count("✗") == 2 for s in shown) == 3
    summary = json.loads((out / "demo.json").read_text())
    assert set(summary["accuracy"]) == {"p-MoD", "dense"} and set(summary["fresh_right"]) == {"p-MoD", "dense"}
    assert any(f"right: p-MoD {summary['fresh_right']['p-MoD']} of 3" in s for s in shown)
    assert summary["flops_ratio"] < 0.6 and summary["kv_ratio"] < 0.75
    for scores in summary["captions"].values():  # the shipped models describe scenes well above chance
        assert set(scores) == {"size", "color", "shape", "count"} and scores["count"] > 0.5 and scores["color"] > 0.5
    sample = summary["sample"]
    assert sample["question"] and set(sample["answers"]) == {"p-MoD", "dense"}
    assert (out / "routing_map.png").read_bytes()[:4] == b"\x89PNG" and (out / "demo.md").exists()


def test_demo_bars_stay_out_of_logs(capsys):
    """Where stderr is not a terminal (a log, a pipe) the demo draws no bars: no carriage returns in the file."""
    from pmod.evaluation.synth_vqa import progress as _bar

    bar = _bar(range(3), "x")
    assert bar.disable and list(bar) == [0, 1, 2] and "\r" not in capsys.readouterr().err


def test_training_script_end_to_end(tmp_path):
    """All stages at a few steps: the ViT on patch labels, two gloo processes on captions, text-only questions,
    then dense and p-MoD side by side."""
    cmd = [sys.executable, str(REPO / "train" / "embedded_default.py"), "--work", str(tmp_path), "--align-steps", "2",
           "--text-steps", "2", "--n-text", "12", "--steps", "2", "--n-train", "24", "--vision-steps", "3", "--no-install"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    for name, schedule in (("dense", "none"), ("pmod", "shiftedcos")):
        model = pmod.from_pretrained(tmp_path / name, dtype=torch.float32)
        assert model.config.mod.schedule == schedule
        log = [json.loads(line) for line in (tmp_path / name / "train_log.jsonl").read_text().splitlines()]
        assert log[-1]["step"] == 2
    assert "2 process(es)" in (tmp_path / "align.log").read_text()
    assert "router_lr: 0.0001" in (tmp_path / "pmod.yaml").read_text()
    # stage 0 changed the tower (only), and stage 1 started from it
    init, vit = (pmod.from_pretrained(tmp_path / d, dtype=torch.float32).state_dict() for d in ("init", "vit-3-0.003"))
    assert init.keys() == vit.keys()
    changed = {k.split(".")[0] for k in init if not torch.equal(init[k], vit[k])}
    assert changed == {"vision_tower"}
    assert f"model: {tmp_path / 'vit-3-0.003'}" in (tmp_path / "align.yaml").read_text()
    # stage 1b: text-only conversations from stage 1's weights; stage 2 starts from its output
    text = json.loads((tmp_path / "data" / "train_text.json").read_text())
    assert len(text) == 12 and not any("image" in c for c in text)
    assert f"model: {tmp_path / 'align'}" in (tmp_path / "language.yaml").read_text()
    assert f"model: {tmp_path / 'language'}" in (tmp_path / "pmod.yaml").read_text()


def test_demo_rejects_bad_counts(tmp_path, capsys):
    assert main(["demo", "--output", str(tmp_path), "--n-test", "0"]) != 0
    assert "--n-test >= 1" in capsys.readouterr().err


def test_text_probe_scores_each_question_type_over_words():
    done = subprocess.run([sys.executable, str(REPO / "train" / "text_probe.py"), str(PMOD_CKPT), "--n", "4"],
                          capture_output=True, text=True, timeout=300, cwd=REPO, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    line = done.stdout.strip().splitlines()[-1]
    assert "over words, 4 questions per type" in line
    for qtype in ("color", "count", "exists", "position", "shape", "choice"):
        assert f"{qtype} " in line


def test_question_attention_reads_the_shipped_dense_model(tmp_path):
    from pmod.tools.synthetic import write_split

    write_split(tmp_path, "val", 12)
    done = subprocess.run([sys.executable, str(REPO / "train" / "question_attention.py"), str(DENSE_CKPT), "--data",
                           str(tmp_path), "--n", "12"], capture_output=True, text=True, timeout=300, cwd=REPO, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert out.count("  layer ") == pmod.load_config(DENSE_CKPT).text.num_hidden_layers and "max on the object word" in out
