"""The package as a user installs it: `pip wheel .` builds without setuptools warnings, the wheel holds the embedded
checkpoints, the pmod_synth task and pmod_kernels (and nothing of tests/, eval/, train/), and installed on its own,
outside the source checkout, `pmod demo` runs and `pmod eval --tasks pmod_synth --limit 4` writes its table."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

ASSET_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "pmod_processor.json")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> tuple[Path, str]:
    """(the wheel, pip's build log). Without build isolation when this environment's setuptools can build it (no
    network); else pip fetches the build requirement from the package index."""
    out = tmp_path_factory.mktemp("wheel")
    local = ["--no-build-isolation"] if int(version("setuptools").split(".")[0]) >= 77 else []
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", *local, "-w", str(out), str(REPO)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (whl,) = out.glob("pmod-*.whl")
    return whl, proc.stdout + proc.stderr


def test_pmod_synth_task_ships_in_the_package(tmp_path):
    """The task file is package data (not read from a source checkout); its module writes a dataset and a task
    folder for lmms-eval that includes the shipped file."""
    from pmod.evaluation.pmod_synth import TASK_YAML

    assert TASK_YAML.is_file() and TASK_YAML.parent.name == "pmod_synth" and "pmod/evaluation" in TASK_YAML.as_posix()
    proc = subprocess.run([sys.executable, "-m", "pmod.evaluation.pmod_synth", "--out", str(tmp_path), "--n", "3"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert len((tmp_path / "test.jsonl").read_text().splitlines()) == 3
    assert json.dumps(str(TASK_YAML)) in (tmp_path / "tasks" / "pmod_synth" / "pmod_synth.yaml").read_text()


@pytest.mark.slow
def test_wheel_builds_without_warnings_and_holds_the_data(wheel):
    whl, log = wheel
    assert "Warning" not in log and "deprecated" not in log, log[-3000:]
    names = set(zipfile.ZipFile(whl).namelist())
    assert "pmod/evaluation/pmod_synth/pmod_synth.yaml" in names and "pmod/evaluation/pmod_synth/utils.py" in names
    for model in ("tiny-synth-pmod", "tiny-synth-dense"):
        assert {f"pmod/assets/{model}/{f}" for f in ASSET_FILES} <= names
    assert "pmod_kernels/__init__.py" in names and not any(n.startswith("kernels/") for n in names)
    assert not any(n.split("/")[0] in ("tests", "eval", "train") for n in names)


@pytest.mark.slow
def test_installed_wheel_runs_demo_and_eval(wheel, tmp_path):
    """The wheel installed into a folder of its own, run from an unrelated folder: the package found there (not the
    checkout), the demo on its shipped checkpoints, and lmms-eval on the shipped pmod_synth task."""
    pytest.importorskip("lmms_eval", reason="the eval extra is not installed")
    whl, _ = wheel
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(whl)],
                   check=True, timeout=600, capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    run = lambda *argv: subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=900, env=env,
                                       cwd=tmp_path)
    found = run("-c", "import pmod, pmod_kernels; print(pmod.__file__); print(pmod_kernels.__file__)")
    assert found.returncode == 0 and all(line.startswith(str(site)) for line in found.stdout.split()), found
    demo = run("-m", "pmod.cli", "demo", "--n-test", "12", "--fresh", "1", "--captions", "2", "--focus-samples", "2")
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert json.loads((tmp_path / "demo-output" / "demo.json").read_text())["accuracy"]["p-MoD"] > 0.3
    ev = run("-m", "pmod.cli", "eval", "--tasks", "pmod_synth", "--limit", "4", "--output", "out", "--quiet")
    assert ev.returncode == 0, ev.stdout[-3000:] + ev.stderr[-3000:]
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| Synth | exact_match |" in table and "GFLOPs" in table
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["models"][0]["costs"]["pmod_synth"]["requests"] == 4
