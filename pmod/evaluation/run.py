"""Run lmms-eval on one checkpoint (or two, side by side) and build the results table: score beside cost.

For each model, lmms-eval's own command line runs in a subprocess (``python -m lmms_eval --model pmod ...``, or
under ``accelerate launch`` for several processes) with its output in ``OUT/<label>/``; the `pmod` plugin leaves
its per-request journal there. The table (`pmod.evaluation.results`) then reads lmms-eval's results JSON (scores) and the journal (costs) and
writes ``OUT/results.{md,json,png}``: per benchmark, each model's score, mean prefill TFLOPs, kept-token ratio and
KV bytes against its dense twin, with the paper's scores alongside.

Why subprocesses: lmms-eval's CLI is the contract users run by hand, and it is what multi-process launches use;
it also swallows exceptions (printing them, exit status 0), so success is judged by the results file it writes.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pmod.evaluation.results import build_table, read_journal, summarize
from pmod.evaluation.tasks import offline_env

__all__ = [
    "ModelRun",
    "build_table",
    "evaluate",
    "latest_results",
    "lmms_eval_command",
    "read_journal",
    "run_lmms_eval",
    "summarize",
    "synth_task_folder",
    "write_tiny_synth",
]

SYNTH_DATA = "pmod_synth-data"  # where `evaluate` writes a pmod_synth dataset into the output folder when none is given


@dataclass
class ModelRun:
    label: str  # column name and output sub-folder
    path: str  # checkpoint folder or hub id


def write_tiny_synth(root: str | Path, n: int = 12, image_size: int = 64) -> Path:
    """A small pmod_synth dataset: `test.jsonl` (id, image, question, answer, type) and `images/`."""
    from pmod.tools.synthetic import write_split

    write_split(root, "test", n, image_size)
    return Path(root)


def synth_task_folder(out: str | Path, data_dir: str | Path) -> Path:
    """An lmms-eval task folder (for --include_path) whose pmod_synth reads `data_dir`: it includes the shipped
    task file and overrides where the data is. Returns the folder."""
    from pmod.evaluation.pmod_synth import TASK_YAML

    data_dir = Path(data_dir).resolve()
    if not (data_dir / "test.jsonl").is_file():
        raise FileNotFoundError(f"{data_dir}: no test.jsonl; write a set with `python -m pmod.evaluation.pmod_synth "
                                "--out DIR`")
    if not TASK_YAML.is_file():
        raise FileNotFoundError(f"the pmod_synth task file is not at {TASK_YAML} (it is package data of pmod)")
    folder = Path(out) / "tasks" / "pmod_synth"
    folder.mkdir(parents=True, exist_ok=True)
    q = lambda p: json.dumps(str(p))  # a JSON string is a YAML string, whatever the path holds
    (folder / "pmod_synth.yaml").write_text(
        f"include: {q(TASK_YAML)}\n"
        f"dataset_kwargs:\n  data_files:\n    test: {q(data_dir / 'test.jsonl')}\n"
        f"lmms_eval_specific_kwargs:\n  default:\n    data_root: {q(data_dir)}\n    pre_prompt: ''\n    post_prompt: ''\n")
    return folder.parent


def lmms_eval_command(model: str, tasks: list[str], output: Path, *, batch_size: int = 1, limit: float | None = None,
                      include_path: list[Path] | None = None, num_processes: int = 1, model_args: dict | None = None,
                      ) -> list[str]:
    """The lmms-eval command line for one model (`accelerate launch` in front for several processes)."""
    args = {"pretrained": model, "batch_size": batch_size, "log": output, **(model_args or {})}
    margs = ",".join(f"{k}={v}" for k, v in args.items() if v is not None)
    if any("," in str(v) or "=" in str(v) for v in args.values() if v is not None):
        raise ValueError(f"lmms-eval model_args cannot hold ',' or '=' in values: {margs}")
    cmd = ["-m", "lmms_eval", "--model", "pmod", "--model_args", margs, "--tasks", ",".join(tasks),
           "--batch_size", str(batch_size), "--output_path", str(output), "--log_samples"]
    if limit is not None:
        cmd += ["--limit", str(limit)]
    if include_path:
        cmd += ["--include_path", ",".join(str(p) for p in include_path)]
    if num_processes > 1:
        return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes), *cmd]
    return [sys.executable, *cmd]


def run_lmms_eval(cmd: list[str], output: Path, env: dict | None = None, echo: bool = True) -> Path:
    """Run the command, teeing its output to OUT/<label>/lmms_eval.log; returns the results JSON it wrote."""
    output.mkdir(parents=True, exist_ok=True)
    start, log = time.time(), output / "lmms_eval.log"
    with open(log, "w") as f, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                                env=env, bufsize=1) as proc:
        f.write(" ".join(cmd) + "\n")
        for line in proc.stdout:
            f.write(line)
            if echo:
                sys.stdout.write(line)
    res = latest_results(output, newer_than=start)
    if proc.returncode != 0 or res is None:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise RuntimeError(f"lmms-eval wrote no results (exit status {proc.returncode}); log: {log}\n{tail}")
    return res


def latest_results(output: Path, newer_than: float = 0.0) -> Path | None:
    found = [p for p in Path(output).rglob("*_results.json") if p.stat().st_mtime >= newer_than]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def evaluate(models: list[ModelRun], tasks: list[str], output: str | Path, *, batch_size: int = 1,
             limit: float | None = None, include_path: list[Path] | None = None, synth_data: str | Path | None = None,
             num_processes: int = 1, model_args: dict | None = None, offline: bool = True, check: bool = True,
             table_only: bool = False, echo: bool = True) -> dict[str, Path]:
    """Evaluate each model on `tasks` with lmms-eval, then write the table. Running it again with the same
    `output` continues an interrupted run (the plugin's journal serves the finished requests)."""
    from pmod.evaluation.tasks import missing_data

    output = Path(output)
    include = list(include_path or [])
    if "pmod_synth" in tasks and not any((Path(p) / "pmod_synth").exists() for p in include):
        if synth_data is None:  # a dataset of our own in the output folder, written once
            from pmod.evaluation.pmod_synth import DEFAULT_N

            synth_data = output / SYNTH_DATA
            if not (synth_data / "test.jsonl").is_file():
                write_tiny_synth(synth_data, n=DEFAULT_N)
                print(f"pmod_synth: no --synth-data given; wrote {DEFAULT_N} samples to {synth_data}", flush=True)
        include.append(synth_task_folder(output, synth_data))
    env = offline_env() if offline else dict(os.environ)
    if check and offline and not table_only:
        missing = missing_data(tasks, include_path=[str(p) for p in include] or None)
        if missing:
            raise FileNotFoundError("data missing for an offline run:\n  " + "\n  ".join(missing)
                                    + "\nfill the Hugging Face cache on a machine with network (`hf download --repo-type dataset REPO`, "
                                    "then copy the cache and point HF_HOME at it), or pass --online")
    summaries = []
    for run in models:
        folder = output / run.label
        if table_only:
            res = latest_results(folder)
            if res is None:
                raise FileNotFoundError(f"{folder}: no lmms-eval results to tabulate")
        else:
            cmd = lmms_eval_command(run.path, tasks, folder, batch_size=batch_size, limit=limit, include_path=include,
                                    num_processes=num_processes, model_args=model_args)
            res = run_lmms_eval(cmd, folder, env=env, echo=echo)
        summaries.append(summarize(run, res, folder, tasks))
    return build_table(summaries, tasks, output)
