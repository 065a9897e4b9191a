"""Two processes on the CPU (accelerate launch, gloo) train like one process with the doubled batch."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import yaml
from test_training_toys import assert_same_training, toy_config, write_data, write_model

from pmod.training import train

REPO = Path(__file__).resolve().parents[1]




def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_match_one_process_with_twice_the_batch(tmp_path):
    model_dir = write_model(tmp_path / "m")
    data = write_data(tmp_path / "d", n=16)  # image and text-only samples: batches of each modality, routers idle in some
    steps = {"max_steps": 6, "save_steps": 6}
    cfg = toy_config(tmp_path, model_dir, data, per_device_batch_size=2, output=str(tmp_path / "two"), **steps)
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "train" / "accelerate" / "cpu-2proc.yaml"),
           "--main_process_port", str(_free_port()), "-m", "pmod.training", "--config", str(tmp_path / "two.yaml")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=REPO, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 process(es) x 2 rows" in done.stdout

    one = train(toy_config(tmp_path, model_dir, data, per_device_batch_size=4, output=str(tmp_path / "one"), **steps))
    assert_same_training(one.output, tmp_path / "two", model_dir)
