"""The strategy comparison: its report (table, plot, the memory check against GradNormLoRP's claim) and, slow,
one end-to-end run of two strategies through the training loop."""
from __future__ import annotations

import json

import pytest

from pmod.tools.compare import ROWS, CompareConfig, adamw_vs_gradnormlorp_7b, compare
from pmod.tools.compare_report import plot, table


def _skip_unless_asked_for_slow(config) -> None:
    """The suite has no default `-m "not slow"`: this test runs only when `-m` selects slow tests."""
    expr = config.option.markexpr or ""
    if "slow" not in expr or "not slow" in expr:
        pytest.skip("slow (a few minutes): run with -m slow")


def _row(label: str, acc: float, state: int) -> dict:
    return {"label": label, "strategy": label.split()[0], "options": {"r": 8} if label == "lora" else {}, "accuracy": acc,
            "trainable": 1000, "state_bytes": state, "state_bytes_8bit": state // 4, "peak_bytes": 2**20, "step_ms": 12.0}


def test_table_and_plot(tmp_path):
    rows = [_row("full", 0.5, 8000), _row("lora", 0.4, 1000), _row("gradnormlorp full 8-bit", 0.45, 800)]
    summary = {"config": CompareConfig(output=str(tmp_path)).__dict__, "base": {"accuracy": 0.3}, "rows": rows, "device": "cpu",
               "seconds": 60.0, "at_7b": adamw_vs_gradnormlorp_7b()}
    md = table(summary)
    assert "| lora | r=8 | 40.0 % | 1,000 |" in md
    assert "a saving of 90.0 %" in md and "89.5 %" in md
    plot(rows, tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 10_000


def test_7b_analytic_saving_uses_the_galore_state_formula():
    at = adamw_vs_gradnormlorp_7b(rank=128)
    assert 50e9 < at["adamw_bytes"] < 56e9  # ~6.76 B trainable parameters x 8 bytes
    assert 0.9 < at["saving"] < 0.99
    assert {r[0] for r in ROWS} >= {"full", "lora", "lisa", "lora-ggpo", "lora-mgpo", "gradnormlorp", "bone", "miss", "ticket"}


@pytest.mark.slow
def test_comparison_runs_end_to_end(tmp_path, request):
    _skip_unless_asked_for_slow(request.config)
    cfg = CompareConfig(output=str(tmp_path), rows=["full", "lora", "ticket"], steps=3, base_steps=2, batch_size=4, n_train=12, n_val=6)
    rows = compare(cfg)
    assert [r["label"] for r in rows] == ["full", "lora", "ticket"]
    summary = json.loads((tmp_path / "comparison.json").read_text())
    assert summary["rows"][1]["trainable"] < summary["rows"][0]["trainable"]
    assert summary["rows"][1]["state_bytes"] < summary["rows"][0]["state_bytes"]
    assert (tmp_path / "comparison.md").read_text().count("\n| ") == 4 and (tmp_path / "comparison.png").is_file()
