"""A run killed with SIGKILL mid-way and resumed ends bitwise equal to an uninterrupted run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_training_toys import toy_config, write_data, write_model

from pmod.training import train
from pmod.training.checkpoint import list_checkpoints

TESTS = Path(__file__).resolve().parent
STEPS, SAVE_EVERY, STALL_AT = 12, 4, 10

RUNNER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    from test_training_toys import toy_config
    from pmod.training import train

    tmp, out, resume, stall = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "1", int(sys.argv[4])

    class Stall:  # holds the process at a known step so that the test can kill it there
        def on_step_end(self, step, logs):
            if step == stall:
                print(f"STALLED {{step}}", flush=True)
                time.sleep(600)

    cfg = toy_config(tmp, tmp / "m", tmp / "d" / "data.json", output=out, max_steps={steps}, save_steps={save},
                     resume="latest" if resume else None)
    train(cfg, callbacks=[Stall()])
    print("FINISHED", flush=True)
""")




def _runner(tmp: Path) -> list[str]:
    script = tmp / "runner.py"
    script.write_text(RUNNER.format(tests=str(TESTS), steps=STEPS, save=SAVE_EVERY))
    return [sys.executable, str(script)]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def test_sigkill_then_resume_is_bitwise_identical(tmp_path):
    write_model(tmp_path / "m")
    write_data(tmp_path / "d", n=20)
    cmd = _runner(tmp_path)

    # 1. killed: SIGKILL while step 10 is held, after the checkpoints of steps 4 and 8 were written
    killed = tmp_path / "killed"
    proc = subprocess.Popen(cmd + [str(tmp_path), str(killed), "0", str(STALL_AT)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=_env())
    try:
        for line in proc.stdout:
            if line.startswith("STALLED"):
                break
        else:
            pytest.fail(f"the run ended (rc={proc.wait()}) before reaching step {STALL_AT}")
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    assert [p.name for p in list_checkpoints(killed)] == ["step-00000004", "step-00000008"]
    assert not (killed / "model.safetensors").exists()  # the run never got to its export

    # 2. resumed from the last complete checkpoint (step 8): steps 9 and 10 are redone
    done = subprocess.run(cmd + [str(tmp_path), str(killed), "1", "-1"], capture_output=True, text=True, env=_env(), timeout=300, check=False)
    assert done.returncode == 0 and "FINISHED" in done.stdout, done.stderr[-2000:]
    assert "resumed from" in done.stdout and "step 8" in done.stdout

    # 3. uninterrupted, same seed, in this process (same thread count)
    straight = train(toy_config(tmp_path, tmp_path / "m", tmp_path / "d" / "data.json", output=str(tmp_path / "straight"),
                                max_steps=STEPS, save_steps=SAVE_EVERY))

    a, b = load_file(straight.output / "model.safetensors"), load_file(killed / "model.safetensors")
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensor(s) differ after resume, e.g. {differ[:3]}"
    # the killed run logged steps 1-10; the resume cut the log back to its checkpoint (step 8) and redid 9-12:
    # every step once, with the uninterrupted run's losses
    log = [json.loads(x) for x in (killed / "train_log.jsonl").read_text().splitlines()]
    ref = {e["step"]: e["loss"] for e in (json.loads(x) for x in (straight.output / "train_log.jsonl").read_text().splitlines())}
    assert [e["step"] for e in log] == list(range(1, STEPS + 1))
    assert all(e["loss"] == ref[e["step"]] for e in log)
