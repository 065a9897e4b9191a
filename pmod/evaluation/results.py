"""The results table of `pmod eval`: lmms-eval's scores (its results JSON) beside each request's cost (the plugin's
journal), per benchmark and model, written as ``results.{md,json,png}`` with the paper's rows alongside."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from pmod.evaluation.tasks import BENCHMARKS, PAPER_EFFICIENCY, PAPER_SCORES, task_average

__all__ = ["build_table", "read_journal", "summarize"]

_EFF_KEYS = ("tflops", "tflops_dense", "tflops_paper", "tflops_paper_dense", "kv_bytes", "kv_bytes_dense", "n_vision", "n_text")
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


def summarize(run, results_file: Path, journal_dir: Path, tasks: list[str]) -> dict:
    """Scores (paper units) and mean costs per benchmark for one model (`run`: a `ModelRun`, its label and path),
    from its results file and journal."""
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
