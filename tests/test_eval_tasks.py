"""The benchmark list: exactly the paper's 14, each a task of the installed lmms-eval, metrics as PMOD_SPEC §9."""
from __future__ import annotations

import pytest

pytest.importorskip("lmms_eval", reason="the eval extra (pip install -e .[eval]) is not installed")

from pmod.evaluation.tasks import (
    BENCHMARKS,
    PAPER_EFFICIENCY,
    PAPER_SCORES,
    PAPER_TASKS,
    missing_data,
    paper_average,
    resolve_tasks,
    score_of,
)

SPEC_TASKS = ["ok_vqa", "scienceqa_img", "mme", "seedbench", "pope_full", "realworldqa", "gqa", "ai2d", "textvqa_val", "chartqa", "docvqa_val", "infovqa_val", "mmbench_en_dev", "mmmu_val"]


@pytest.fixture(scope="module")
def task_manager():
    """lmms-eval's task index: reads task YAMLs only, no dataset, no network."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from lmms_eval.tasks import TaskManager

    return TaskManager("ERROR")


def test_default_task_list_is_exactly_the_papers_14():
    from pmod.cli import build_parser

    assert list(PAPER_TASKS) == SPEC_TASKS
    args = build_parser().parse_args(["eval", "--model", "x"])
    assert args.tasks.split(",") == SPEC_TASKS


def test_every_paper_task_resolves_in_installed_lmms_eval(task_manager):
    from lmms_eval import utils

    leaves = resolve_tasks(list(PAPER_TASKS), task_manager=task_manager)
    assert list(leaves) == list(PAPER_TASKS)
    for name, found in leaves.items():
        bench = BENCHMARKS[name]
        assert tuple(found) == bench.leaves, name  # groups: ok_vqa -> ok_vqa_val2014, pope_full -> 3 splits
        for leaf in found:  # the metric we read is one the task reports
            cfg = utils.load_yaml_config(task_manager.task_index[leaf]["yaml_path"], mode="simple")
            assert bench.metric in [m["metric"] for m in cfg["metric_list"]], (name, leaf)


def test_unknown_task_is_named(task_manager):
    with pytest.raises(ValueError, match="no_such_bench"):
        resolve_tasks(["mme", "no_such_bench"], task_manager=task_manager)


def test_missing_dataset_names_task_and_cache(task_manager, tmp_path, monkeypatch):
    from pmod.evaluation import tasks

    monkeypatch.setattr(tasks, "_hub_cache", lambda: tmp_path / "hub")
    monkeypatch.setattr(tasks, "_datasets_cache", lambda: tmp_path / "datasets")
    problems = missing_data(["mme", "pope_full"], task_manager=task_manager)
    assert len(problems) == 4 and problems[0].startswith("mme (mme): dataset") and str(tmp_path / "hub") in problems[0]
    repo = problems[0].split("'")[1]  # e.g. lmms-lab-encoder/MME
    (tmp_path / "hub" / f"datasets--{repo.replace('/', '--')}" / "snapshots" / "abc").mkdir(parents=True)
    assert [p for p in missing_data(["mme"], task_manager=task_manager)] == []


def test_paper_scores_reproduce_the_papers_average_column():
    for model, scores in PAPER_SCORES.items():
        assert paper_average(scores) == pytest.approx(PAPER_EFFICIENCY[model]["avg"], abs=0.006), model


def test_score_of_reads_leaves_and_units():
    res = {"results": {
        "pope_adv": {"pope_f1_score,none": 0.84}, "pope_pop": {"pope_f1_score,none": 0.86},
        "pope_random": {"pope_f1_score,none": 0.88, "pope_accuracy,none": 0.5},
        "mme": {"mme_perception_score,none": 1482.8, "mme_cognition_score,none": 300.0},
        "ok_vqa_val2014": {"exact_match,none": 0.56, "submission,none": None},
    }}
    assert score_of("pope_full", res) == pytest.approx(86.0)
    assert score_of("mme", res) == pytest.approx(1482.8)
    assert score_of("ok_vqa", res) == pytest.approx(56.0)
    assert score_of("gqa", res) is None
