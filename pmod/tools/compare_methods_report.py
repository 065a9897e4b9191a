"""The report of `pmod compare-methods`: a markdown table, the JSON, and an accuracy-vs-FLOPs Pareto plot, each
written atomically (temp file + rename)."""
from __future__ import annotations

import json
from pathlib import Path

from pmod.io.atomic import atomic_write, atomic_write_text

__all__ = ["pareto", "table", "write_results"]

_MARKERS = {"dense": "s", "p-MoD": "*", "fastv": "o", "pyramiddrop": "^", "visionzip": "D", "random": "x", "uniform": "+"}


def table(rows: list[dict]) -> str:
    types = sorted(rows[0]["per_type"])
    head = ("| model / method | budget | keep | accuracy | " + " | ".join(types)
            + " | prefill GFLOPs | FLOPs vs dense | KV KiB | KV vs dense | wall s |")
    lines = [head, "|" + "---|" * (len(types) + 10)]
    dense_kv = rows[0]["kv_bytes"]
    for r in rows:
        keep = "-" if r["keep"] in (None, 1.0) else f"{r['keep']:.3f}"
        budget = r["budget"] if isinstance(r["budget"], str) else f"{100 * r['budget']:.0f} %"
        lines.append(f"| {r['name']} | {budget} | {keep} | {100 * r['accuracy']:.1f} % | "
                     + " | ".join(f"{100 * r['per_type'][t]:.0f}" for t in types)
                     + f" | {r['gflops']:.4f} | {100 * r['flops_share']:.1f} % | {r['kv_bytes'] / 1024:.1f} | "
                       f"{100 * r['kv_bytes'] / dense_kv:.1f} % | {r['wall_s']:.1f} |")
    return "\n".join(lines)


def pareto(rows: list[dict], tol: float = 0.005) -> list[dict]:
    """The rows no other row beats: a row is beaten by one at most `tol` more FLOPs share (budgets are matched to
    about that) with higher accuracy, or by one at fewer FLOPs with equal accuracy. Ascending FLOPs."""
    def beats(o, r):
        return o is not r and ((o["flops_share"] <= r["flops_share"] + tol and o["accuracy"] > r["accuracy"])
                               or (o["flops_share"] < r["flops_share"] and o["accuracy"] == r["accuracy"]))
    return sorted((r for r in rows if not any(beats(o, r) for o in rows)), key=lambda r: r["flops_share"])


def _plot(rows: list[dict], path: Path, n: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    by_method: dict[str, list[dict]] = {}
    for r in rows:
        by_method.setdefault(r["method"], []).append(r)
    for method, rs in by_method.items():
        rs = sorted(rs, key=lambda r: r["flops_share"])
        xs, ys = [100 * r["flops_share"] for r in rs], [100 * r["accuracy"] for r in rs]
        big = method in ("dense", "p-MoD")
        ax.plot(xs, ys, marker=_MARKERS.get(method, "o"), linestyle="none" if big else "-", markersize=14 if big else 7,
                label=method if method != "p-MoD" else "p-MoD (trained)")
        if method == "p-MoD":
            for r in rs:
                ax.annotate(r["name"], (100 * r["flops_share"], 100 * r["accuracy"]), textcoords="offset points",
                            xytext=(8, -12), fontsize=8)
    front = pareto(rows)
    ax.plot([100 * r["flops_share"] for r in front], [100 * r["accuracy"] for r in front], "k--", linewidth=1,
            alpha=0.5, drawstyle="steps-post", label="Pareto front (budgets within 0.5 pt count as equal)")
    ax.set_xlabel("prefill FLOPs, % of dense (complete convention: decoder + lm_head)")
    ax.set_ylabel(f"test accuracy, % ({n} questions, exact match)")
    ax.set_title("Synthetic VQA (embedded default): accuracy vs prefill FLOPs\n"
                 "p-MoD (trained) vs training-free reduction of the dense twin")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png"))
    plt.close(fig)


def write_results(out_dir: Path, summary: dict) -> str:
    """results.json, results.md and results.png under out_dir; returns the markdown table."""
    rows = summary["rows"]
    md = table(rows)
    front = ", ".join(r["name"] for r in pareto(rows))
    atomic_write_text(out_dir / "results.json", json.dumps(summary, indent=2) + "\n")
    atomic_write_text(out_dir / "results.md", md + f"\n\nPareto front (accuracy vs FLOPs): {front}\n")
    _plot(rows, out_dir / "results.png", summary["n_test"])
    return md
