"""Run lmms-eval on one checkpoint (or two, side by side) and build the results table: score beside cost.

For each model, lmms-eval's own command line runs in a subprocess (``python -m lmms_eval --model pmod ...``, or
under ``accelerate launch`` for several processes) with its output in ``OUT/<label>/``; the `pmod` plugin leaves
its per-request journal there. The table then reads lmms-eval's results JSON (scores) and the journal (costs) and
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

from pmod.evaluation.tasks import BENCHMARKS, PAPER_EFFICIENCY, PAPER_SCORES, offline_env, task_average

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
_EFF_KEYS = ("tflops", "tflops_dense", "tflops_paper", "tflops_paper_dense", "kv_bytes", "kv_bytes_dense", "n_vision", "n_text")


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


_COST_FIELDS = {"task": str, "doc_id": (int, str), **{k: (int, float) for k in _EFF_KEYS}}


def read_journal(folder: Path, model: str | None = None) -> list[dict]:
    """The plugin's trusted per-request records in `folder` (all ranks; `pmod.evaluation.journal` checks each line
    and warns about the ones it drops), one per request key (the latest); `model` selects a checkpoint path."""
    from pmod.evaluation.journal import read_records

    recs: dict[str, dict] = {}
    bad = 0
    for r in read_records(folder, warn=lambda m: print(m, file=sys.stderr))[0]:
        if any(not isinstance(r.get(k), t) or isinstance(r.get(k), bool) for k, t in _COST_FIELDS.items()):
            bad += 1
            continue
        if model is None or r.get("model") == model:
            recs[r["key"]] = r
    if bad:
        print(f"pmod: {bad} journal record(s) in {folder} lack cost fields; left out of the table", file=sys.stderr)
    return list(recs.values())


def _samples_docs(results_file: Path) -> dict[str, set]:
    """(leaf task -> doc ids) that lmms-eval scored in the run of `results_file` (its --log_samples files)."""
    date_id = results_file.name[: -len("_results.json")]
    docs: dict[str, set] = {}
    for f in results_file.parent.glob(f"{date_id}_samples_*.jsonl"):
        task = f.stem[len(date_id) + len("_samples_"):]
        docs[task] = {json.loads(line)["doc_id"] for line in f.read_text().splitlines() if line.strip()}
    return docs


def _mean_costs(recs: list[dict]) -> dict:
    """Means per request, and ratios of sums against the dense twin."""
    if not recs:
        return {"requests": 0}
    n = len(recs)
    mean = {k: sum(r[k] for r in recs) / n for k in _EFF_KEYS}
    kept = [r["kept_ratio"] for r in recs if r.get("kept_ratio") is not None]
    return {
        "requests": n, **mean,
        "flops_ratio": mean["tflops"] / mean["tflops_dense"], "flops_ratio_paper": mean["tflops_paper"] / mean["tflops_paper_dense"],
        "kept_ratio": sum(kept) / len(kept) if kept else None, "kv_ratio": mean["kv_bytes"] / mean["kv_bytes_dense"],
    }


def summarize(run: ModelRun, results_file: Path, journal_dir: Path, tasks: list[str]) -> dict:
    """Scores (paper units) and mean costs per benchmark for one model, from its results file and journal."""
    from pmod.evaluation.tasks import score_of

    results = json.loads(results_file.read_text())
    groups = results.get("group_subtasks", {})
    scored = _samples_docs(results_file)
    model_path = str(Path(run.path).expanduser().resolve()) if Path(run.path).expanduser().exists() else run.path
    # the requests of the documents this run scored (a journal may also hold those of an earlier, larger run)
    journal = [r for r in read_journal(journal_dir, model_path)
               if r.get("round", 0) == 0 and (r["task"] not in scored or r["doc_id"] in scored[r["task"]])]
    leaves = {t: set(BENCHMARKS[t].leaves) if t in BENCHMARKS else set(groups.get(t) or [t]) for t in tasks}
    scores = {t: score_of(t, results) for t in tasks}
    costs = {t: _mean_costs([r for r in journal if r["task"] in leaves[t]]) for t in tasks}
    costs["all"] = _mean_costs([r for r in journal if any(r["task"] in v for v in leaves.values())])
    return {"label": run.label, "path": run.path, "results_file": str(results_file), "scores": scores,
            "average": task_average(scores), "costs": costs, "limit": results.get("config", {}).get("limit")}


def _fmt(v, spec: str = ".1f", suffix: str = "") -> str:
    return "–" if v is None else f"{v:{spec}}{suffix}"


def _paper_rows(model_paths: list[str]) -> list[str]:
    """The paper's rows to print beside ours: LLaVA-NeXT's for anyres checkpoints, else LLaVA-1.5's."""
    try:
        from pmod.io import load_config

        nxt = any(load_config(p).image_aspect_ratio == "anyres" for p in model_paths)
    except (OSError, ValueError, KeyError):  # a checkpoint that is gone: the table is still worth writing
        nxt = False
    return ["p-MoD-LLaVA-NeXT-7B", "LLaVA-NeXT-7B"] if nxt else ["p-MoD-LLaVA-1.5-7B", "LLaVA-1.5-7B"]


def build_table(summaries: list[dict], tasks: list[str], out: Path) -> dict[str, Path]:
    """results.md, results.json and results.png in `out`: each benchmark's score beside each model's costs."""
    from pmod.flops import flops_unit

    out.mkdir(parents=True, exist_ok=True)
    paper = _paper_rows([s["path"] for s in summaries])
    # one FLOPs unit for the table: TFLOPs at 7B shapes, GFLOPs for a small model (not 0.0004 TFLOPs)
    unit, scale = flops_unit(max([c.get("tflops") or 0 for s in summaries for c in s["costs"].values()] + [0]) * 1e12)
    head = ["benchmark", "metric"]
    for s in summaries:
        head += [f"{s['label']} score", unit, "vs dense", "kept", "KV MiB", "KV vs dense"]
    head += [f"paper {p}" for p in paper]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in [*tasks, "all"]:
        b = BENCHMARKS.get(t)
        row = ["**average**" if t == "all" else (b.label if b else t), "mean (MME/20)" if t == "all" else (b.metric if b else "")]
        for s in summaries:
            c = s["costs"].get(t, {})
            score = s["average"] if t == "all" else s["scores"].get(t)
            flops = None if c.get("tflops") is None else c["tflops"] * 1e12 / scale
            row += [_fmt(score, ".2f"), _fmt(flops, ".4g"), _fmt(_pct(c.get("flops_ratio")), ".1f", " %"),
                    _fmt(_pct(c.get("kept_ratio")), ".1f", " %"), _fmt(_mib(c.get("kv_bytes")), ".3g"),
                    _fmt(_pct(c.get("kv_ratio")), ".1f", " %")]
        row += [_fmt(PAPER_EFFICIENCY[p]["avg"] if t == "all" and len(tasks) == 14 else PAPER_SCORES[p].get(t), ".2f")
                for p in paper]
        lines.append("| " + " | ".join(row) + " |")
    notes = [
        "", "Score: lmms-eval's metric in the paper's unit (percent; MME-P is a sum of subtask scores). Costs are means",
        f"per request of the prefill, from the plugin's journal: {unit} in the complete convention (all matmuls incl.",
        "attention scores; `pmod.evaluation.efficiency.measure_efficiency`), kept = vision tokens processed averaged over layers,",
        "KV = cache bytes after prefill in the model's dtype; 'vs dense' = the same prompt through the dense twin.",
        "results.json also has the paper's FLOPs convention (tflops_paper). Paper TFLOPs/KV for its rows: "
        + ", ".join(f"{p} {PAPER_EFFICIENCY[p]['tflops']} TFLOPs, KV {100 * PAPER_EFFICIENCY[p]['kv_ratio']:.1f} %" for p in paper) + ".",
    ]
    if any(s.get("limit") for s in summaries):
        notes.append(f"Run with --limit {summaries[0].get('limit')}: scores are NOT comparable to the paper's.")
    md, js, png = out / "results.md", out / "results.json", out / "results.png"
    md.write_text("\n".join(lines + notes) + "\n")
    js.write_text(json.dumps({"tasks": tasks, "models": summaries, "paper": {p: PAPER_SCORES[p] for p in PAPER_SCORES},
                              "paper_efficiency": PAPER_EFFICIENCY}, indent=2, default=str) + "\n")
    _plot(summaries, tasks, png)
    return {"md": md, "json": js, "png": png}


def _pct(v):
    return None if v is None else 100 * v


def _mib(v):
    return None if v is None else v / 2**20


def _plot(summaries: list[dict], tasks: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(max(9.0, 3 + 0.6 * len(tasks) * len(summaries)), 4.5), width_ratios=[3, 1])
    w = 0.8 / len(summaries)
    labels = [BENCHMARKS[t].label + ("/20" if BENCHMARKS[t].avg_weight != 1 else "") if t in BENCHMARKS else t for t in tasks]
    for i, s in enumerate(summaries):
        vals = [(s["scores"].get(t) or 0) * (BENCHMARKS[t].avg_weight if t in BENCHMARKS else 1) for t in tasks]
        ax.bar([j + i * w for j in range(len(tasks))], vals, w, label=s["label"])
        c = s["costs"].get("all", {})
        bx.bar([j + i * w for j in range(3)], [_pct(c.get(k)) or 0 for k in ("flops_ratio", "kept_ratio", "kv_ratio")], w,
               label=s["label"])
    ax.set_xticks([j + 0.4 - w / 2 for j in range(len(tasks))], labels, rotation=45, ha="right")
    ax.set_ylabel("score (paper units)")
    ax.set_ylim(bottom=0)
    ax.set_title("scores")
    ax.legend()
    bx.set_xticks([j + 0.4 - w / 2 for j in range(3)], ["FLOPs", "kept", "KV"])
    bx.set_ylabel("% of dense")
    bx.set_ylim(0, 105)
    bx.set_title("prefill vs dense")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
