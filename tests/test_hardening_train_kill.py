"""Hardening of training (issue 16), the kill loop: a run SIGKILLed again and again while it writes its checkpoints
(at a random instant inside a random write) ends bitwise equal to an uninterrupted one, with its log holding each
step once and no leftovers."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from test_hardening_training import _log, _same_weights
from test_training_toys import toy_config, write_data, write_model

from pmod.training import train
from pmod.training.checkpoint import list_checkpoints

TESTS = Path(__file__).resolve().parent

# --- a run killed again and again while it writes its checkpoints -------------------------------------------------
ZYGOTE = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {tests!r})
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    import pmod.training.checkpoint as ck
    import pmod.training.loop as loop
    from test_training_toys import toy_config
    from pmod.training import train
    from transformers import CLIPVisionModel, PreTrainedTokenizerFast  # imported once, before the forks
    from accelerate import Accelerator

    real = ck.save_checkpoint

    def announced(*a, **k):  # tells the test a checkpoint write began, so that it can kill inside it
        print("SAVING", flush=True)
        return real(*a, **k)

    loop.save_checkpoint = announced
    root, out = Path(sys.argv[1]), sys.argv[2]
    for line in sys.stdin:
        pid = os.fork()
        if pid == 0:
            try:
                train(toy_config(root, root / "m", root / "d" / "data.json", output=out, max_steps={steps}, save_steps=1,
                                 save_total_limit=2, resume="latest"))
                print("FINISHED", flush=True)
            finally:
                os._exit(0)
        print("PID", pid, flush=True)
        os.waitpid(pid, 0)
        print("REAPED", flush=True)
""")


def test_training_killed_while_writing_checkpoints_resumes_bitwise(tmp_path):
    """Every round: resume, then SIGKILL at a random instant inside the write of a random checkpoint (kept: the last
    2). 6 rounds, then a last resume to the end: the weights and every logged loss equal an uninterrupted run's."""
    steps = 10
    write_model(tmp_path / "m")
    write_data(tmp_path / "d", n=12)
    out = tmp_path / "killed"
    script = tmp_path / "zygote.py"
    script.write_text(ZYGOTE.format(tests=str(TESTS), steps=steps))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    zygote = subprocess.Popen([sys.executable, str(script), str(tmp_path), str(out)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    rng = random.Random(7)
    kills = mid_write = 0
    try:
        for _ in range(7):
            zygote.stdin.write("go\n")
            zygote.stdin.flush()
            line = zygote.stdout.readline()
            assert line.startswith("PID"), (line, zygote.stderr.read()[-3000:] if zygote.poll() is not None else "")
            pid, saves, finished = int(line.split()[1]), rng.randint(1, 2), False
            while True:
                line = zygote.stdout.readline()
                assert line, zygote.stderr.read()[-3000:]
                if line.startswith("FINISHED"):
                    finished = True
                    break
                if line.startswith("SAVING"):
                    saves -= 1
                    if saves == 0 and kills < 6:
                        time.sleep(rng.uniform(0.0, 0.05))
                        os.kill(pid, signal.SIGKILL)
                        kills += 1
                        break
            while not zygote.stdout.readline().startswith("REAPED"):
                pass
            mid_write += any((out / "checkpoints").glob(".tmp-step-*"))
            if finished:
                break
    finally:
        zygote.kill()
        zygote.wait(timeout=30)
    assert kills == 6 and finished, (kills, finished)
    print(f"{kills} kills, {mid_write} of them left a half-written .tmp-step-* folder")
    straight = train(toy_config(tmp_path, tmp_path / "m", tmp_path / "d" / "data.json", output=str(tmp_path / "straight"),
                                max_steps=steps, save_steps=1, save_total_limit=2))
    assert _same_weights(out, straight.output)
    ref = {e["step"]: e["loss"] for e in _log(straight.output)}
    log = _log(out)
    assert [e["step"] for e in log] == list(range(1, steps + 1))
    assert all(e["loss"] == ref[e["step"]] for e in log)
    assert [p.name for p in list_checkpoints(out)] == [f"step-{steps - 1:08d}", f"step-{steps:08d}"]
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
