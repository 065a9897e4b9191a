"""Hardening of training and resume (issue 16): nothing in a run folder is unpickled (a planted pickle never runs),
`--resume` with `--output` alone continues the saved run, changed settings are refused naming each field (or,
allowed, really take effect), a corrupt latest step falls back to the previous one naming the bad file, the log
holds each step once, image paths stay inside --image-folder. The kill loop is test_hardening_train_kill.py."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import planted_pickle
from safetensors.torch import load_file
from test_training_toys import toy_config, write_data, write_model

from pmod.training import train
from pmod.training.checkpoint import list_checkpoints

STEPS, EVERY, STOP = 6, 2, 4


class _Stop(Exception):
    pass


class _StopAt:
    def __init__(self, step: int):
        self.step = step

    def on_save(self, step, path):
        if step == self.step:
            raise _Stop


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny model and data, one uninterrupted 6-step run, and one stopped after its step-4 checkpoint. One thread,
    as the tests' own runs (a module fixture is set up before the per-test thread setting: another thread count
    would change float reduction orders, and bitwise comparisons with it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = tmp_path_factory.mktemp("runs")
        model, data = write_model(root / "m"), write_data(root / "d", n=12)
        cfg = lambda out, **kw: toy_config(root, model, data, output=str(out), max_steps=STEPS, save_steps=EVERY, **kw)  # noqa: E731
        straight = train(cfg(root / "straight"))
        with pytest.raises(_Stop):
            train(cfg(root / "stopped"), callbacks=[_StopAt(STOP)])
    finally:
        torch.set_num_threads(threads)
    return {"root": root, "cfg": cfg, "straight": straight.output, "stopped": root / "stopped"}


def _copy(runs, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(runs["stopped"], out)
    return out


def _log(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]


def _same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


# --- no code execution ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin"])
def test_a_planted_pickle_never_runs(runs, tmp_path, name):
    out = _copy(runs, tmp_path)
    marker = tmp_path / "PWNED"
    planted_pickle(out / "checkpoints" / "step-00000004" / name, marker)
    with pytest.raises(ValueError, match=rf"{name}") as e:
        train(runs["cfg"](out, resume="latest"))
    assert not marker.exists(), "the planted pickle ran"
    assert "never" in str(e.value) and "pickl" in str(e.value)


def _as_legacy(step: Path) -> None:
    """Rewrite one of our checkpoints in the layout pmod wrote before its own state files (accelerate's pickles)."""
    import numpy as np

    from pmod.io.state import load_tree

    torch.save(load_tree(step, "optimizer"), step / "optimizer.bin")
    torch.save(load_tree(step, "scheduler"), step / "custom_checkpoint_0.pkl")
    torch.save(load_tree(step, "strategy"), step / "custom_checkpoint_1.pkl")
    rng = load_tree(step, "rng_state_0")
    torch.save({"step": 0, "random_state": rng["python"], "numpy_random_seed": tuple(rng["numpy"]),
                "torch_manual_seed": rng["torch"]}, step / "random_states_0.pkl")
    assert isinstance(rng["numpy"][1], np.ndarray)
    for p in list(step.glob("*.json")) + list(step.glob("*.safetensors")):
        if p.name not in ("model.safetensors", "trainer_state.json"):
            p.unlink()
    st = json.loads((step / "trainer_state.json").read_text())
    st.pop("files"), st.pop("format")
    (step / "trainer_state.json").write_text(json.dumps(st))


def test_an_earlier_pmod_checkpoint_resumes_safely_and_exactly(runs, tmp_path):
    out = _copy(runs, tmp_path)
    _as_legacy(out / "checkpoints" / "step-00000004")
    train(runs["cfg"](out, resume="latest"))
    assert _same_weights(out, runs["straight"])
    out2 = tmp_path / "run2"
    shutil.copytree(runs["stopped"], out2)
    step = out2 / "checkpoints" / "step-00000004"
    _as_legacy(step)
    marker = tmp_path / "PWNED"
    planted_pickle(step / "random_states_0.pkl", marker)
    with pytest.raises(ValueError, match=r"random_states_0\.pkl: refused by the weights-only unpickler"):
        train(runs["cfg"](out2, resume="latest"))
    assert not marker.exists()


def test_a_truncated_optimizer_bin_of_an_earlier_pmod_falls_back(runs, tmp_path, capsys):
    out = _copy(runs, tmp_path)
    step = out / "checkpoints" / "step-00000004"
    _as_legacy(step)
    _truncate(step / "optimizer.bin")
    train(runs["cfg"](out, resume="latest"))
    said = capsys.readouterr().out
    assert "step-00000004 is unusable" in said and "optimizer.bin: corrupt or truncated" in said
    assert _same_weights(out, runs["straight"])


# --- resume from the saved config; changed settings ------------------------------------------------------------
def test_resume_with_output_alone_reads_the_saved_config(runs, tmp_path, capsys):
    from pmod.cli import main

    out = _copy(runs, tmp_path)
    assert main(["train", "--output", str(out), "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert _same_weights(out, runs["straight"])
    assert [e["step"] for e in _log(out)] == list(range(1, STEPS + 1))  # each step once (issue 17)
    ref = {e["step"]: e["loss"] for e in _log(runs["straight"])}
    assert all(e["loss"] == ref[e["step"]] for e in _log(out))


def test_a_changed_learning_rate_is_refused_then_really_applied(runs, tmp_path):
    out = _copy(runs, tmp_path)
    with pytest.raises(ValueError, match=r"learning_rate: saved 0\.003, given 0\.001.*--allow-config-change"):
        train(runs["cfg"](out, resume="latest", learning_rate=1e-3))
    train(runs["cfg"](out, resume="latest", learning_rate=1e-3, allow_config_change=True))
    got = {e["step"]: e["lr"] for e in _log(out)}
    ref = {e["step"]: e["lr"] for e in _log(runs["straight"])}
    assert all(got[s] == ref[s] for s in range(1, STOP + 1))  # the steps before the resume keep their record
    for s in range(STOP + 1, STEPS + 1):  # from the resume on, the new rate on the same schedule
        assert got[s] == pytest.approx(ref[s] / 3, rel=1e-12), (s, got[s], ref[s])
    assert not _same_weights(out, runs["straight"])
    import yaml

    assert yaml.safe_load((out / "train_config.yaml").read_text())["learning_rate"] == 1e-3


def test_resume_with_another_mod_schedule_is_refused_naming_it(runs, tmp_path, capsys):
    from pmod.cli import main

    out = _copy(runs, tmp_path)
    assert main(["train", "--output", str(out), "--resume", "--mod-schedule", "none"]) == 2
    err = capsys.readouterr().err
    assert "mod: saved None, given {'schedule': 'none'}" in err and "mod cannot change on resume" in err
    assert main(["train", "--output", str(out), "--resume", "--mod-schedule", "none", "--allow-config-change"]) == 2
    assert "mod cannot change on resume" in capsys.readouterr().err


# --- corrupt checkpoints -------------------------------------------------------------------------------------------
def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 2)])


@pytest.mark.parametrize("victim", ["model.safetensors", "optimizer", "trainer_state.json"])
def test_a_corrupt_latest_step_falls_back_naming_the_file(runs, tmp_path, victim, capsys):
    out = _copy(runs, tmp_path)
    step = out / "checkpoints" / "step-00000004"
    bad = step / victim if victim != "optimizer" else next(p for p in sorted(step.iterdir()) if p.name.startswith("optimizer")
                                                             and p.suffix in (".safetensors", ".bin"))
    _truncate(bad)
    train(runs["cfg"](out, resume="latest"))
    said = capsys.readouterr().out
    assert f"checkpoint step-00000004 is unusable" in said and bad.name in said and "falling back" in said
    assert "resumed from" in said and "step-00000002" in said
    assert _same_weights(out, runs["straight"])  # steps 3-4 redone from step 2: the same result
    assert [e["step"] for e in _log(out)] == list(range(1, STEPS + 1))


def test_leftovers_of_an_interrupted_swap_or_prune(tmp_path):
    """A re-save swaps step-N aside as .old-step-N before renaming the new one in: killed between the two renames,
    the old complete one is put back. A prune renames to .del-step-N first: a half-deleted step is never listed."""
    from pmod.training.checkpoint import clean_partial

    root = tmp_path / "checkpoints"
    for name in (".old-step-00000004", ".del-step-00000002", ".tmp-step-00000006"):
        (root / name).mkdir(parents=True)
        (root / name / "trainer_state.json").write_text("{}")
    clean_partial(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == ["step-00000004"]


def test_no_usable_checkpoint_is_a_clear_error(runs, tmp_path):
    out = _copy(runs, tmp_path)
    for step in list_checkpoints(out):
        _truncate(step / "model.safetensors")
    with pytest.raises(ValueError, match=r"no usable checkpoint.*step-00000004, step-00000002 are corrupt"):
        train(runs["cfg"](out, resume="latest"))


def test_output_under_a_regular_file_is_refused(runs, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(NotADirectoryError, match=r"--output .*file/run lies under .*file, which is a regular file"):
        train(runs["cfg"](f / "run"))


# --- records -------------------------------------------------------------------------------------------------------
def test_image_paths_must_stay_inside_the_image_folder(tmp_path):
    from pmod.training.records import read_records

    folder = tmp_path / "images"
    folder.mkdir()
    from PIL import Image

    for p in (folder / "ok.png", tmp_path / "secret.png"):
        Image.new("RGB", (4, 4)).save(p)
    turns = [{"from": "human", "value": "<image>\nwhat ?"}, {"from": "gpt", "value": "red"}]
    recs = [{"id": "in", "image": "ok.png", "conversations": turns},
            {"id": "up", "image": "../secret.png", "conversations": turns},
            {"id": "abs", "image": str(tmp_path / "secret.png"), "conversations": turns},
            {"id": "sneaky", "image": "images/../../secret.png", "conversations": turns}]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(recs))
    samples, report = read_records(data, str(folder))
    assert [s.id for s in samples] == ["in"]
    assert report.counts["image_outside_folder"] == 3
    assert "#1 id=up: image[0] = '../secret.png' lies outside --image-folder" in report.summary() or \
        any("'../secret.png' lies outside" in e for e in report.examples["image_outside_folder"])
    samples, report = read_records(data, str(folder), allow_outside=True)
    assert [s.id for s in samples] == ["in", "up", "abs"]  # 'images/../../secret.png' needs images/images/ to exist


def test_bad_records_name_the_field(tmp_path):
    from pmod.training.records import read_records

    good = {"id": "g", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    recs = [good, {"id": "b1", "conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "yo"}]},
            {"id": "b2", "conversations": [{"from": "human", "value": 3}]}, {"id": "b3", "image": 7, "conversations": good["conversations"]}]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(recs))
    _, report = read_records(data, None)
    ex = " | ".join(report.examples["bad_record"])
    assert "#1 id=b1: conversations[1].from = 'bot'" in ex
    assert "#2 id=b2: conversations[0].value must be a string, got int" in ex
    assert "#3 id=b3: field 'image' must be a file name" in ex
