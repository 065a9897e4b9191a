"""Hardening of checkpoint writing (issue 16): atomic whole-checkpoint saves (a SIGKILL at any instant leaves the
old or the new complete model) and one source for which weight files are read. Reading: test_hardening_io_read.py."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from safetensors.torch import save_file

import pmod

TESTS = Path(__file__).resolve().parent


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items()}


def _which(loaded, models: dict[str, object]) -> str:
    """The name of the model `loaded` equals exactly (config and every tensor); fails on a mix."""
    got = _state(loaded)
    for name, m in models.items():
        want = _state(m)
        if loaded.config == m.config and got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want):
            return name
    raise AssertionError("the reloaded checkpoint is neither model: a mix of two saves")


# --- atomic saves ---------------------------------------------------------------------------------------------
# A "zygote" imports and builds once, then forks one saver per round (a new process each, as after a restart,
# without paying transformers' import each time); the test SIGKILLs the saver at a random instant.
ZYGOTE = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {tests!r})
    import torch
    torch.set_num_threads(1)
    from conftest import tiny_model
    a, b = tiny_model(seed=1, layers=4), tiny_model(seed=2, layers=5)
    for line in sys.stdin:
        i = int(line)
        pid = os.fork()
        if pid == 0:
            try:
                while True:  # alternate the two models, one file vs several shards
                    (a if i % 2 == 0 else b).save_pretrained(sys.argv[1], max_shard_size="5GB" if i % 2 == 0 else "60KB")
                    i += 1
                    print("SAVED", flush=True)
            finally:
                os._exit(1)
        print("PID", pid, flush=True)
        os.waitpid(pid, 0)
        print("REAPED", flush=True)
""")


def test_kill_loop_during_saves_always_leaves_one_complete_model(tmp_path):
    """12 SIGKILLs at random instants of repeated saves that alternate two models (1 shard vs several): every
    reload is exactly one of them, never a mix, never unloadable."""
    a, b = tiny_model(seed=1, layers=4), tiny_model(seed=2, layers=5)
    folder = tmp_path / "ckpt"
    script = tmp_path / "zygote.py"
    script.write_text(ZYGOTE.format(tests=str(TESTS)))
    zygote = subprocess.Popen([sys.executable, str(script), str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    rng = random.Random(16)
    seen, pending = [], 0
    try:
        for kill in range(12):
            zygote.stdin.write(f"{kill}\n")
            zygote.stdin.flush()
            line = zygote.stdout.readline()
            assert line.startswith("PID"), (line, zygote.stderr.read()[-2000:] if zygote.poll() is not None else "")
            pid = int(line.split()[1])
            saves = rng.randint(1, 3)
            while saves:  # a few complete saves of this process, then a random instant within the next ones
                line = zygote.stdout.readline()
                assert line.startswith("SAVED"), line
                saves -= 1
            time.sleep(rng.uniform(0.0, 0.03))
            os.kill(pid, signal.SIGKILL)
            while not zygote.stdout.readline().startswith("REAPED"):
                pass
            pending += any(p.name.startswith(".pmod-save-") for p in folder.iterdir())
            loaded = pmod.from_pretrained(folder)
            name = _which(loaded, {"a": a, "b": b})
            seen.append(name)
    finally:
        zygote.kill()
        zygote.wait(timeout=30)
    assert set(seen) == {"a", "b"}
    print(f"models read back after each kill: {seen}; {pending} kill(s) fell between a commit and its end")


def _count_calls(monkeypatch, fail_at: int | None):
    """Make the `fail_at`-th rename or unlink of a save raise (a crash there); return the call counter."""
    calls = {"n": 0}
    real_replace, real_unlink = os.replace, Path.unlink

    def tick():
        calls["n"] += 1
        if fail_at is not None and calls["n"] == fail_at:
            raise KeyboardInterrupt(f"crash at step {fail_at}")

    def replace(src, dst, *a, **k):
        tick()
        return real_replace(src, dst, *a, **k)

    def unlink(self, *a, **k):
        tick()
        return real_unlink(self, *a, **k)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(Path, "unlink", unlink)
    return calls


@pytest.mark.parametrize("first,second", [("5GB", "60KB"), ("60KB", "5GB"), ("60KB", "100KB")])
def test_a_crash_at_every_step_of_a_save_leaves_old_or_new(tmp_path, monkeypatch, first, second):
    """Every rename / unlink of a save, one after the other, is made to fail: before the commit the old model
    loads, from the commit on the new one; the shard count may change either way; the next save recovers."""
    old, new = tiny_model(seed=1, layers=4), tiny_model(seed=2, layers=5)
    ref = tmp_path / "ref"
    old.save_pretrained(ref, max_shard_size=first)
    calls = _count_calls(monkeypatch, None)
    new.save_pretrained(tmp_path / "count", max_shard_size=second)
    total = calls["n"]
    monkeypatch.undo()
    assert total >= 3
    results = []
    for k in range(1, total + 1):
        folder = tmp_path / f"crash{k}"
        shutil.copytree(ref, folder)
        _count_calls(monkeypatch, k)
        with pytest.raises(KeyboardInterrupt):
            new.save_pretrained(folder, max_shard_size=second)
        monkeypatch.undo()
        results.append(_which(pmod.from_pretrained(folder), {"old": old, "new": new}))
        old.save_pretrained(folder, max_shard_size=first)  # the next save finishes or drops the interrupted one
        assert _which(pmod.from_pretrained(folder), {"old": old}) == "old"
        assert not [p for p in folder.iterdir() if p.name.startswith(".")], "leftovers after the next save"
    assert results[0] == "old" and results[-1] == "new"
    assert results == sorted(results, key=lambda r: r == "new")  # old ... old, new ... new: one commit point


def test_stale_bin_index_never_wins_over_a_fresh_save(tmp_path):
    old, new = tiny_model(seed=1), tiny_model(seed=2)
    torch.save(_state(old), tmp_path / "pytorch_model-00001-of-00001.bin")
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: "pytorch_model-00001-of-00001.bin" for k in _state(old)}}))
    new.save_pretrained(tmp_path)
    assert _which(pmod.from_pretrained(tmp_path), {"old": old, "new": new}) == "new"


def test_sharded_then_single_then_sharded_reads_only_the_current_set(tmp_path):
    a, b = tiny_model(seed=1), tiny_model(seed=2)
    a.save_pretrained(tmp_path, max_shard_size="60KB")
    b.save_pretrained(tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["config.json", "model.safetensors"]
    assert _which(pmod.from_pretrained(tmp_path), {"a": a, "b": b}) == "b"
    a.save_pretrained(tmp_path, max_shard_size="60KB")
    assert "model.safetensors" not in {p.name for p in tmp_path.iterdir()}
    assert _which(pmod.from_pretrained(tmp_path), {"a": a, "b": b}) == "a"


def test_temp_leftovers_are_ignored_by_readers_and_removed_by_the_next_save(tmp_path):
    a, b = tiny_model(seed=1), tiny_model(seed=2)
    a.save_pretrained(tmp_path)
    (tmp_path / ".model.safetensors.x1y2.tmp").write_bytes(b"half a file")
    (tmp_path / ".config.json.abcd.tmp").write_text("{")
    staging = tmp_path / ".pmod-save-0123456789ab"  # an interrupted save, never committed
    staging.mkdir()
    save_file({"junk": torch.zeros(3)}, str(staging / "model.safetensors"))
    assert _which(pmod.from_pretrained(tmp_path), {"a": a}) == "a"
    b.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert _which(pmod.from_pretrained(tmp_path), {"b": b}) == "b"


def test_save_pretrained_onto_a_file_is_a_clear_error(tmp_path):
    f = tmp_path / "not-a-folder"
    f.write_text("x")
    with pytest.raises(NotADirectoryError, match=r"not-a-folder is a regular file"):
        tiny_model().save_pretrained(f)
    with pytest.raises(NotADirectoryError, match=r"under .*not-a-folder, which is a regular file"):
        tiny_model().save_pretrained(f / "sub")
    assert f.read_text() == "x"


def test_config_save_is_atomic(tmp_path, monkeypatch):
    """A crash while config.json is written (here: a value that cannot be serialised, met half-way) leaves the
    previous file, never an empty or half-written one."""
    model = tiny_model()
    model.config.save(tmp_path)
    before = (tmp_path / "config.json").read_text()
    bad = model.config.replace(model_max_length=77)
    monkeypatch.setattr(type(bad), "to_dict", lambda self: {"a": 1, "z": object()})
    with pytest.raises(TypeError):
        bad.save(tmp_path)
    assert (tmp_path / "config.json").read_text() == before
