"""`pmod compare-methods` on a few test questions: rows, matched FLOPs, measured KV = predicted, atomic outputs."""
from __future__ import annotations

import json

from pmod.cli import main
from pmod.evaluation.synth_vqa import DENSE_CKPT
from pmod.io import load_config
from pmod.tools.compare_methods import match_keep
from pmod.tools.compare_methods_report import pareto


def test_compare_methods_writes_the_report(tmp_path, capsys):
    out = tmp_path / "cm"
    assert main(["compare-methods", "--n-test", "8", "--batch-size", "4", "--methods", "fastv,uniform",
                 "--budgets", "pmod,0.4", "--output", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert list(summary) == ["dense", "p-MoD", "fastv @p-MoD", "uniform @p-MoD", "fastv @40 %", "uniform @40 %"]
    rows = json.loads((out / "results.json").read_text())["rows"]
    pmod_share = rows[1]["flops_share"]
    for r in rows:
        assert r["kv_bytes"] == r["kv_bytes_predicted"]  # measured from the cache = pmod.flops' count
        target = {"pmod": pmod_share, 0.4: 0.4}.get(r["budget"])
        if target is not None:
            assert abs(r["flops_share"] - target) < 0.02
    assert (out / "results.png").stat().st_size > 10_000 and "| dense |" in (out / "results.md").read_text()
    assert not list(out.glob(".*.tmp"))


def test_match_keep_hits_the_target_and_bad_budgets_are_named(tmp_path):
    cfg = load_config(DENSE_CKPT)
    spec, share = match_keep(cfg, "fastv", 0.5, cfg.vision.num_patches, 30)
    assert abs(share - 0.5) < 0.005 and spec.layers == (2,)
    assert main(["compare-methods", "--budgets", "1.5", "--output", str(tmp_path)]) == 2
    assert main(["compare-methods", "--methods", "sparsevlm", "--output", str(tmp_path)]) == 2


def test_pareto_front():
    rows = [{"flops_share": 1.0, "accuracy": 0.8}, {"flops_share": 0.5, "accuracy": 0.8}, {"flops_share": 0.3, "accuracy": 0.6},
            {"flops_share": 0.5, "accuracy": 0.7}, {"flops_share": 0.298, "accuracy": 0.4}]  # the last: a near-equal budget
    assert pareto(rows) == [rows[2], rows[1]]
    assert pareto(rows, tol=0.0) == [rows[4], rows[2], rows[1]]
