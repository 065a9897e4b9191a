"""The comparison's outputs: a markdown table (with the optimizer-memory check against GradNormLoRP's claim)
and a PNG of accuracy, optimizer state, peak memory and step time per strategy."""
from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["PAPER_SAVING", "plot", "table"]

PAPER_SAVING = 0.895  # GradNormLoRP (arXiv 2412.19616): "8-bit GradNormLoRP reduces optimizer memory by up to 89.5 %"


def _kib(b: float) -> str:
    return f"{b / 1024:,.0f}"


def _opts(o: dict[str, Any]) -> str:
    shown = {k: v for k, v in o.items() if k != "mask_from"}
    return ", ".join(f"{k}={v}" for k, v in shown.items()) + (", mask from `full`" if "mask_from" in o else "")


def table(summary: dict[str, Any]) -> str:
    rows, cfg = summary["rows"], summary["config"]
    head = ("| strategy | options | val accuracy | trainable params | optimizer state KiB | 8-bit moments KiB (analytic) "
            "| peak memory MiB | step ms |")
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['label']} | {_opts(r['options'])} | {100 * r['accuracy']:.1f} % | {r['trainable']:,} | "
                     f"{_kib(r['state_bytes'])} | {_kib(r['state_bytes_8bit'])} | {r['peak_bytes'] / 2**20:.1f} | {r['step_ms']:.0f} |")
    mem = "max allocated (CUDA)" if summary["device"] == "cuda" else "peak RSS over the training steps above the RSS before step 0 (CPU)"
    base = summary["base"]
    start = (f"the checkpoint `{base['exported']}` ({100 * base['accuracy']:.1f} % on all six types)" if cfg.get("base") else
             f"the same base checkpoint (full fine-tuning, vision tower included, for {cfg['base_steps']} steps on colour / "
             f"shape / count questions: {100 * base['accuracy']:.1f} % on all six types)")
    intro = (
        f"Synthetic VQA (`pmod.tools.synthetic`), {cfg['n_train']} training images x 3 questions, {cfg['n_val']} validation questions; "
        f"every strategy starts from {start} and trains {cfg['steps']} steps of batch "
        f"{cfg['batch_size']} on all six types through `pmod.training.train`; accuracy is greedy exact match of the exported, "
        f"merged checkpoint. Learning rates: base {cfg['lr_base']}, full-weight {cfg['lr_full']}, adapters {cfg['lr_adapter']}, GaLore full-weight "
        f"{cfg['lr_galore']}. Peak memory: {mem}. Device: {summary['device']}, {summary['seconds'] / 60:.1f} min in all."
    )
    out = [intro, "", *lines, ""]
    full = next((r for r in rows if r["label"] == "full"), None)
    g8 = next((r for r in rows if r["label"] == "gradnormlorp full 8-bit"), None)
    at7b = summary["at_7b"]
    out.append("Optimizer state against AdamW full fine-tuning (GradNormLoRP claims up to "
               f"{100 * PAPER_SAVING:.1f} % less with 8-bit states):")
    out.append("")
    if full and g8:
        out.append(f"- measured here (tiny model, rank 32, real 8-bit states): {_kib(g8['state_bytes'])} KiB vs "
                   f"{_kib(full['state_bytes'])} KiB, a saving of {100 * (1 - g8['state_bytes'] / full['state_bytes']):.1f} %;")
    out.append(f"- analytic at p-MoD-LLaVA-7B shapes (rank 128): {at7b['gradnormlorp8_bytes'] / 2**30:.2f} GiB vs "
               f"{at7b['adamw_bytes'] / 2**30:.2f} GiB, a saving of {100 * at7b['saving']:.1f} %.")
    return "\n".join(out) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["label"] for r in rows]
    panels = [("val accuracy (%)", [100 * r["accuracy"] for r in rows]), ("optimizer state (KiB)", [r["state_bytes"] / 1024 for r in rows]),
              ("peak memory (MiB)", [r["peak_bytes"] / 2**20 for r in rows]), ("step time (ms)", [r["step_ms"] for r in rows])]
    fig, axes = plt.subplots(2, 2, figsize=(12, 7))
    for ax, (title, vals) in zip(axes.flat, panels):
        ax.bar(range(len(vals)), vals, color="tab:blue")
        ax.set_title(title)
        ax.set_xticks(range(len(vals)), labels, rotation=40, ha="right", fontsize=8)
    fig.suptitle("Fine-tuning strategies on the synthetic task: same start, same steps")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
