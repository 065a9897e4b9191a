"""The paper's 14 lmms-eval benchmarks: names, the metric each reports, the published scores, and offline checks.

PMOD_SPEC §7 lists the tasks, §9 the metric of each and the scores of the four models (the paper's baselines are
the authors' own dense models). lmms-eval reports a metric as ``results[leaf_task]["<metric>,<filter>"]``; two of
the 14 names are groups without an aggregate (``ok_vqa`` = ``ok_vqa_val2014``; ``pope_full`` = adversarial,
popular and random, whose F1 the paper averages), so each benchmark names its leaf tasks and how to combine them.
Scores are shown as the paper prints them: percentages, except MME (a sum of subtask scores, up to 2000), which
the paper's average divides by 20.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "BENCHMARKS",
    "PAPER_EFFICIENCY",
    "PAPER_SCORES",
    "PAPER_TASKS",
    "Benchmark",
    "missing_data",
    "offline_env",
    "paper_average",
    "resolve_tasks",
    "score_of",
    "task_average",
]


@dataclass(frozen=True)
class Benchmark:
    name: str  # the lmms-eval task or group name users pass to --tasks
    label: str  # the paper's column header
    metric: str  # metric key in lmms-eval's results (before ",<filter>")
    leaves: tuple[str, ...]  # the leaf tasks holding the metric; their values are averaged
    scale: float = 100.0  # lmms-eval value -> the paper's unit
    avg_weight: float = 1.0  # weight in the paper's average (MME / 20)


BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in [
    Benchmark("ok_vqa", "OK-VQA", "exact_match", ("ok_vqa_val2014",)),
    Benchmark("scienceqa_img", "SQA", "exact_match", ("scienceqa_img",)),
    Benchmark("mme", "MME-P", "mme_perception_score", ("mme",), scale=1.0, avg_weight=1 / 20),
    Benchmark("seedbench", "SEED", "seed_image", ("seedbench",)),
    Benchmark("pope_full", "POPE", "pope_f1_score", ("pope_adv", "pope_pop", "pope_random")),
    Benchmark("realworldqa", "RWQA", "exact_match", ("realworldqa",)),
    Benchmark("gqa", "GQA", "exact_match", ("gqa",)),
    Benchmark("ai2d", "AI2D", "exact_match", ("ai2d",)),
    Benchmark("textvqa_val", "Text", "exact_match", ("textvqa_val",)),
    Benchmark("chartqa", "Chart", "relaxed_overall", ("chartqa",)),
    Benchmark("docvqa_val", "Doc", "anls", ("docvqa_val",)),
    Benchmark("infovqa_val", "Info", "anls", ("infovqa_val",)),
    Benchmark("mmbench_en_dev", "MMB", "gpt_eval_score", ("mmbench_en_dev",), scale=1.0),  # already a percentage
    Benchmark("mmmu_val", "MMMU", "mmmu_acc", ("mmmu_val",)),
    # our local synthetic task (pmod/evaluation/pmod_synth, shipped in the package): not one of the paper's
    Benchmark("pmod_synth", "Synth", "exact_match", ("pmod_synth",)),
]}

# The order of PMOD_SPEC §7 and of the issue; `pmod eval` runs exactly these by default.
PAPER_TASKS: tuple[str, ...] = (
    "ok_vqa", "scienceqa_img", "mme", "seedbench", "pope_full", "realworldqa", "gqa", "ai2d", "textvqa_val",
    "chartqa", "docvqa_val", "infovqa_val", "mmbench_en_dev", "mmmu_val",
)

_COLUMNS = ("seedbench", "realworldqa", "mme", "mmbench_en_dev", "pope_full", "gqa", "ai2d", "docvqa_val", "chartqa",
            "textvqa_val", "infovqa_val", "ok_vqa", "mmmu_val", "scienceqa_img")  # PMOD_SPEC §9's column order
_ROWS = {
    "LLaVA-1.5-7B": (66.2, 55.6, 1506.8, 64.1, 85.9, 61.9, 55.2, 28.1, 18.2, 46.0, 25.8, 53.4, 36.6, 69.7),
    "p-MoD-LLaVA-1.5-7B": (66.5, 55.7, 1482.8, 65.4, 85.5, 62.2, 56.2, 27.6, 16.8, 44.8, 26.8, 56.0, 36.3, 69.3),
    "LLaVA-NeXT-7B": (68.9, 57.6, 1519.3, 67.5, 87.2, 63.5, 64.0, 70.1, 61.6, 62.7, 34.7, 54.0, 35.3, 69.7),
    "p-MoD-LLaVA-NeXT-7B": (69.0, 57.6, 1495.5, 67.3, 86.8, 63.3, 65.1, 70.0, 61.8, 60.5, 34.1, 55.1, 36.0, 71.0),
}
PAPER_SCORES: dict[str, dict[str, float]] = {m: dict(zip(_COLUMNS, row)) for m, row in _ROWS.items()}
# The paper's TFLOPs (prefill, its convention) and KV cache share, and its average column, for the same rows.
PAPER_EFFICIENCY: dict[str, dict[str, float]] = {
    "LLaVA-1.5-7B": {"tflops": 8.38, "kv_ratio": 1.0, "avg": 53.00},
    "p-MoD-LLaVA-1.5-7B": {"tflops": 4.92, "kv_ratio": 0.538, "avg": 53.09},
    "LLaVA-NeXT-7B": {"tflops": 39.46, "kv_ratio": 1.0, "avg": 62.34},
    "p-MoD-LLaVA-NeXT-7B": {"tflops": 21.94, "kv_ratio": 0.538, "avg": 62.31},
}


def paper_average(scores: dict[str, float]) -> float | None:
    """The paper's average over its 14 benchmarks (MME / 20); None unless all 14 are present."""
    if not all(t in scores and scores[t] is not None for t in PAPER_TASKS):
        return None
    return sum(scores[t] * BENCHMARKS[t].avg_weight for t in PAPER_TASKS) / len(PAPER_TASKS)


def task_average(scores: dict[str, float | None]) -> float | None:
    """The same weighting over whichever benchmarks were run (for subsets); None if there are none."""
    vals = [v * BENCHMARKS[t].avg_weight if t in BENCHMARKS else v for t, v in scores.items() if v is not None]
    return sum(vals) / len(vals) if vals else None


def score_of(task: str, results: dict) -> float | None:
    """A benchmark's score in the paper's unit from lmms-eval's results JSON (its "results" mapping); None if absent.

    Unknown tasks (not in BENCHMARKS) report the first numeric metric lmms-eval gives, unscaled."""
    res = results.get("results", results)
    bench = BENCHMARKS.get(task)
    if bench is None:
        entry = res.get(task, {})
        nums = [v for k, v in entry.items() if "," in k and "_stderr" not in k and isinstance(v, (int, float))]
        return float(nums[0]) if nums else None
    vals = []
    for leaf in bench.leaves:
        entry = res.get(leaf, {})
        key = next((k for k in entry if k.split(",")[0] == bench.metric), None)
        if key is None or not isinstance(entry[key], (int, float)):
            return None
        vals.append(float(entry[key]))
    return sum(vals) / len(vals) * bench.scale


def _task_manager(include_path: str | list[str] | None = None):
    from lmms_eval.tasks import TaskManager

    return TaskManager("ERROR", include_path=include_path)


def resolve_tasks(names: list[str], include_path: str | list[str] | None = None, task_manager=None) -> dict[str, list[str]]:
    """Each name -> its leaf task names, as the installed lmms-eval resolves them (no data is read).

    Raises ValueError naming the unknown names."""
    tm = task_manager or _task_manager(include_path)
    unknown = [n for n in names if n not in tm.all_tasks]
    if unknown:
        raise ValueError(f"lmms-eval {_lmms_version()} does not know the task(s) {unknown}; "
                         f"`lmms-eval --tasks list` lists the installed ones (add --include_path for local task folders)")
    return {n: _leaves(tm, n) for n in names}


def _leaves(tm, name: str) -> list[str]:
    from lmms_eval import utils

    entry = tm.task_index[name]
    if entry["type"] != "group":
        return [name]
    cfg = utils.load_yaml_config(entry["yaml_path"], mode="simple")
    subs = cfg.get("task", [])
    out = []
    for s in subs if isinstance(subs, list) else [subs]:
        out += _leaves(tm, s if isinstance(s, str) else s["task"])
    return out


def missing_data(names: list[str], include_path: str | list[str] | None = None, task_manager=None) -> list[str]:
    """One line per leaf task whose data is not on this machine (empty: all present), without any network access.

    Hub datasets must be in the Hugging Face cache (hub snapshots under HF_HUB_CACHE, or the `datasets` cache);
    local builders (json, parquet, ...) need their `data_files`. Used before an offline run so that a missing
    dataset is named up front rather than failing deep inside lmms-eval."""
    from lmms_eval import utils

    tm = task_manager or _task_manager(include_path)
    problems = []
    for name, leaves in resolve_tasks(names, task_manager=tm).items():
        for leaf in leaves:
            cfg = utils.load_yaml_config(tm.task_index[leaf]["yaml_path"], mode="simple")
            path, kwargs = cfg.get("dataset_path"), cfg.get("dataset_kwargs") or {}
            if path in ("json", "csv", "parquet", "text", "arrow", "pandas"):
                files = kwargs.get("data_files")
                flat = list(files.values()) if isinstance(files, dict) else ([files] if isinstance(files, str) else files or [])
                absent = [f for f in flat if not Path(f).is_file()]
                if absent:
                    problems.append(f"{name} ({leaf}): local data file(s) {absent} not found")
            elif path and not Path(path).is_dir() and not kwargs.get("load_from_disk") and not _in_hf_cache(path):
                problems.append(f"{name} ({leaf}): dataset {path!r} is not in the local Hugging Face cache "
                                f"(looked in {_hub_cache()} and {_datasets_cache()})")
    return problems


def _hub_cache() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _datasets_cache() -> Path:
    try:  # lmms-eval may redirect the datasets cache (LMMS_EVAL_DATASETS_CACHE); ask it where it reads
        from lmms_eval.api.task import _resolve_hf_datasets_cache_dir

        return Path(_resolve_hf_datasets_cache_dir())
    except ImportError:
        from datasets import config

        return Path(config.HF_DATASETS_CACHE)


def _in_hf_cache(repo_id: str) -> bool:
    snapshots = _hub_cache() / f"datasets--{repo_id.replace('/', '--')}" / "snapshots"
    if snapshots.is_dir() and any(snapshots.iterdir()):
        return True
    return (_datasets_cache() / repo_id.replace("/", "___")).is_dir()


def _lmms_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lmms-eval")
    except PackageNotFoundError:
        return "(not installed)"


def offline_env() -> dict[str, str]:
    """Environment for a network-free lmms-eval run: the hub and `datasets` read only their local caches."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
