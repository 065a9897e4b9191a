"""The Grokking-ticket report: runs-*.json (from train/grokking_tickets.py) -> results.{json,md,png}.

    python train/grokking_tickets.py --report [--out eval/results/grokking-2026-12-02]
"""
from __future__ import annotations

import io
import json
import statistics
from pathlib import Path

LABELS = {"dense": "dense (wd 1)", "ticket": "ticket (wd 1)", "ticket-wd0": "ticket (wd 0)",
          "random": "random mask, same density (wd 1)", "memorized": "ticket from the memorising net (wd 1)",
          "ticket-local": "ticket, per-tensor top-k (wd 1)", "ticket-newinit": "ticket mask on a new init (wd 1)",
          "ticket-delta": "delta mode: top Δ=W_T-W_0 trains, rest frozen at W_0 (wd 0)"}
COLORS = {"dense": "black", "ticket": "tab:red", "ticket-wd0": "tab:orange", "random": "tab:blue",
          "memorized": "tab:green", "ticket-local": "tab:purple", "ticket-newinit": "tab:brown", "ticket-delta": "tab:olive"}


def steps_to(hist: dict, threshold: float = 0.95) -> int | None:
    return next((s for s, a in zip(hist["step"], hist["test_acc"]) if a >= threshold), None)


def setting(s: dict) -> str:
    """Runs are grouped by architecture, modulus and training fraction."""
    return f"{s['arch']}, P={s['p']}, {100 * s['frac_train']:.0f} % train"


def summarise(seeds: list[dict]) -> list[dict]:
    """One row per (arch, run): steps to 95 % per seed (None: not within the run), its mean over the seeds that
    got there, and the ratio to dense on the same seeds."""
    rows = []
    for arch in sorted({setting(s) for s in seeds}):
        group = [s for s in seeds if setting(s) == arch]
        names = [n for n in LABELS if any(n in s["runs"] for s in group)]
        for name in names:
            per = {s["seed"]: s["runs"][name] for s in group if name in s["runs"]}
            reach = {sd: steps_to(r["hist"]) for sd, r in per.items()}
            dense = {s["seed"]: steps_to(s["runs"]["dense"]["hist"]) for s in group}
            got = [v for v in reach.values() if v is not None]
            ratios = [reach[sd] / dense[sd] for sd in reach if reach[sd] is not None and dense.get(sd)]
            rows.append({"setting": arch, "run": name, "steps_to_95": reach, "max_steps": {sd: r["hist"]["step"][-1] for sd, r in per.items()},
                         "mean_steps_to_95": statistics.mean(got) if got else None,
                         "reached": f"{len(got)}/{len(reach)}",
                         "speedup_vs_dense": statistics.mean([1 / r for r in ratios]) if ratios else None,
                         "final_test_acc": {sd: r["hist"]["test_acc"][-1] for sd, r in per.items()},
                         "density": statistics.mean(r["density"] for r in per.values()),
                         "seconds": sum(r["seconds"] for r in per.values())})
    return rows


def markdown(rows: list[dict], seeds: list[dict]) -> str:
    out = ["| setting | run | kept | steps to 95 % test, per seed | mean | speed-up vs dense | final test acc | wall s |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        per = ", ".join(f"{v}" if v is not None else f">{r['max_steps'][sd]}" for sd, v in sorted(r["steps_to_95"].items()))
        mean = f"{r['mean_steps_to_95']:.0f} ({r['reached']})" if r["mean_steps_to_95"] is not None else f"never ({r['reached']})"
        sp = f"{r['speedup_vs_dense']:.2f}x" if r["speedup_vs_dense"] is not None else "-"
        acc = ", ".join(f"{100 * a:.1f}" for _, a in sorted(r["final_test_acc"].items()))
        out.append(f"| {r['setting']} | {LABELS[r['run']]} | {100 * r['density']:.1f} % | {per} | {mean} | {sp} | {acc} | {r['seconds']:.0f} |")
    mem = [f"{setting(s)} seed {s['seed']}: step {s['memorized_at']['step']} (test {100 * s['memorized_at']['test_acc']:.1f} %)"
           for s in seeds if "memorized_at" in s]
    if mem:
        out += ["", "Memorising checkpoints (first step at 100 % train accuracy): " + "; ".join(mem) + "."]
    return "\n".join(out) + "\n"


def plot(seeds: list[dict]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    archs = sorted({setting(s) for s in seeds})
    fig, axes = plt.subplots(1, len(archs), figsize=(7 * len(archs), 4.6), squeeze=False)
    for ax, arch in zip(axes[0], archs):
        group = [s for s in seeds if setting(s) == arch]
        seen: set[str] = set()  # one legend entry per run, also for runs only a later seed has
        for i, s in enumerate(sorted(group, key=lambda s: s["seed"])):
            for name, r in s["runs"].items():
                h = r["hist"]
                ax.plot(h["step"], [100 * a for a in h["test_acc"]], color=COLORS[name], lw=1.4 if i == 0 else 0.8,
                        alpha=1 if i == 0 else 0.45, label=None if name in seen else LABELS[name])
                seen.add(name)
                if name == "dense" and i == 0:
                    ax.plot(h["step"], [100 * a for a in h["train_acc"]], color="gray", ls=":", lw=1, label="dense, train acc")
        ax.axhline(95, color="gray", lw=0.6, ls="--")
        s0 = group[0]
        ax.set_title(f"{s0['arch']}: (a+b) mod {s0['p']}, {100 * s0['frac_train']:.0f} % train, keep {100 * s0['keep']:.0f} %, "
                     f"{len(group)} seed(s)", fontsize=10)
        ax.set_xlabel("training step (full batch)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_ylim(-2, 102)
        ax.legend(fontsize=7.5, loc="lower right")
    fig.suptitle("Grokking tickets vs dense vs random pruning (seed 0 bold, others faint; dashed: 95 %)", fontsize=11)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def report(folder: Path) -> None:
    from grokking_tickets import write_atomic

    folder = Path(folder)
    files = sorted(folder.glob("runs-*.json"))
    if not files:
        raise SystemExit(f"no runs-*.json in {folder}: run train/grokking_tickets.py first")
    loaded = [json.loads(f.read_text()) for f in files]
    seeds = [s for d in loaded for s in d["seeds"]]
    rows = summarise(seeds)
    meta = {f.name: {"args": d["args"], "wall_seconds": d["wall_seconds"], "torch": d["torch"]} for f, d in zip(files, loaded)}
    write_atomic(folder / "results.json", json.dumps({"rows": rows, "runs_files": meta}, indent=1))
    write_atomic(folder / "results.md", markdown(rows, seeds))
    write_atomic(folder / "results.png", plot(seeds))
    print(markdown(rows, seeds))
