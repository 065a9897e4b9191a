"""The bars checked against a run, and its markdown report and speed-up plot."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


# ---------------------------------------------------------------------------------------------- checks and reports
def evaluate_checks(res: dict) -> list[dict]:
    """The issue's bars, each with the figure measured in this run (ratios of medians)."""
    checks = []

    def add(name, value, bar, ok, what):
        checks.append({"name": name, "value": value, "bar": bar, "pass": bool(ok), "what": what})

    for r in res.get("prefill", []):
        if r["model"] == "prd":
            add(f"prefill_vs_ideal@{r['n_vision']}", r["fraction_of_ideal"], ">= 0.95", r["fraction_of_ideal"] >= 0.95,
                f"p-MoD/dense prefill speed-up {r['speedup_median']:.3f} / ideal {r['ideal_speedup']:.3f}")
    dec = res.get("decode", [])
    for r in dec:
        if r["model"] != "prd" or r["batch"] != max(x["batch"] for x in dec):
            continue
        d = next(x for x in dec
                 if x["model"] == "dense" and x["batch"] == r["batch"] and x["n_vision"] == r["n_vision"])
        ratio = r["tokens_per_s"] / d["tokens_per_s"]
        add(f"decode_b{r['batch']}_pmod_vs_dense@{r['n_vision']}", ratio, ">= 1.0", ratio >= 1.0,
            f"decode tokens/s p-MoD {r['tokens_per_s']:.1f} vs dense {d['tokens_per_s']:.1f}")
        add(f"kv_ratio@{r['n_vision']}", r["kv_ratio"], "<= 0.56", r["kv_ratio"] <= 0.56,
            "KV bytes p-MoD / dense, text tokens included (measured from the cache)")
        add(f"kv_vision_ratio@{r['n_vision']}", r["kv_vision_ratio"], "<= 0.56", r["kv_vision_ratio"] <= 0.56,
            "KV bytes of vision tokens p-MoD / dense (the paper's convention, integer k)")
    if "hf_decode" in res:
        h = res["hf_decode"]
        add("decode_step_vs_hf_generate", h["step_ratio"], "<= 0.6", h["step_ratio"] <= 0.6,
            f"batch-1 decode step ours {h['ours_step_ms']:.2f} ms vs HF generate {h['hf_step_ms']:.2f} ms "
            f"(GEMV + attention floor {h['floor_step_ms']:.2f} ms)")
        add("decode_overhead_vs_hf_generate", h["overhead_ratio"], "<= 0.6 (ours)", h["overhead_ratio"] <= 0.6,
            f"time above the floor: ours {h['ours_overhead_ms']:.2f} ms vs HF {h['hf_overhead_ms']:.2f} ms per step")
        if "graph_step_ratio" in h:
            add("decode_step_cuda_graph_vs_hf_generate", h["graph_step_ratio"], "<= 0.6", h["graph_step_ratio"] <= 0.6,
                f"batch-1 decode step, ours with cuda_graph=True {h['ours_graph_step_ms']:.2f} ms vs HF generate "
                f"{h['hf_step_ms']:.2f} ms; same tokens as without: {bool(h['graph_tokens_match'])}")
    if "batching" in res:
        b = res["batching"]
        add(f"batch{b['prompts']}_vs_one_by_one", b["speedup_median"], ">= 3.0", b["speedup_median"] >= 3.0,
            f"{b['prompts']} prompts: one by one {b['one_by_one']['median_ms']:.0f} ms vs batched "
            f"{b['batched']['median_ms']:.0f} ms")
    for r in res.get("hf_prefill", []):
        add(f"prefill_vs_hf_llamamodel@{r['n_tokens']}", r["ratio_median"], "<= 1.0", r["ratio_median"] <= 1.0,
            f"dense decoder ours {r['ours']['median_ms']:.1f} ms vs LlamaModel {r['hf']['median_ms']:.1f} ms")
    for r in res.get("packing", []):
        for v in ("padded_ours", "padded_hf"):
            if v in r:
                add(f"packed_vs_{v}[{r['model']}]", r[v]["speedup_median"], "> 1.0", r[v]["speedup_median"] > 1.0,
                    f"padded {r[v]['median_ms']:.1f} ms vs packed {r['packed']['median_ms']:.1f} ms")
    return checks


def _mib(x) -> str:
    return "-" if x is None else f"{x / 2**20:.1f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: str) -> list[str]:
    """Markdown table lines; `align` has one letter per column: l(eft) or r(ight)."""
    rule = "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|"
    return ["| " + " | ".join(header) + " |", rule, *("| " + " | ".join(str(c) for c in r) + " |" for r in rows), ""]


def _md_meta(m: dict) -> list[str]:
    return [
        f"# pmod bench — preset `{m['preset']}` on {m['device_name']}", "",
        (f"`{m.get('command') or 'pmod.bench.run_benchmark(...)'}` — {m['date']}, commit {m.get('commit')}; torch {m['torch']}, transformers "
        f"{m['transformers']}; {m['threads']} thread(s), {m['dtype']}, attention {m['attn_backend']}; warm-up "
        f"{m['warmup']}, {m['reps']} interleaved repetitions (median, min); routers ~ N(0, {m['router_std']}), "
        f"routing non-trivial: {m.get('routing_nontrivial')}; {m['seconds']:.0f} s in all."), "",
        (f"Load average {m.get('loadavg_start')} at start, {m.get('loadavg_end')} at end; share of the machine's CPU "
        f"time used by other processes, per section: {m.get('others_cpu_share')} (CPU timings are clean near 0)."), "",
    ]


def md_prefill(rows: list[dict]) -> list[str]:
    head = ["vision tok", "model", "kept ratio", "TFLOPs", "ideal", "ideal, causal attn", "median ms", "min ms",
            "tok/s", "speed-up (median / min / paired)", "of ideal", "peak MiB", "KV MiB"]
    body = [[r["n_vision"], r["model"], f"{r['kept_ratio']:.3f}", f"{r['tflops']:.4f}", f"{r['ideal_speedup']:.3f}",
             f"{r['ideal_speedup_causal']:.3f}", f"{r['median_ms']:.1f}", f"{r['min_ms']:.1f}",
             f"{r['tokens_per_s']:.0f}",
             f"{r['speedup_median']:.3f} / {r['speedup_min']:.3f} / {r['speedup_paired']:.3f}",
             f"{r['fraction_of_ideal']:.3f}",
             _mib(r["peak_bytes"]), _mib(r["kv_bytes"])] for r in rows]
    return ["## Prefill (batch 1; speed-up and ideal vs dense; FLOPs: complete convention)", "",
            *_table(head, body, "rlrrrrrrrrrrr")]


def md_decode(rows: list[dict]) -> list[str]:
    head = ["vision tok", "batch", "model", "ms/step", "tok/s", "KV MiB", "KV / dense", "vision KV / dense", "peak MiB"]
    body = [[r["n_vision"], r["batch"], r["model"], f"{r['ms_per_step']:.2f}", f"{r['tokens_per_s']:.1f}",
             _mib(r["kv_bytes"]), f"{r['kv_ratio']:.3f}", f"{r['kv_vision_ratio']:.3f}", _mib(r["peak_bytes"])]
            for r in rows]
    return [f"## Decode ({rows[0]['steps']} greedy steps over the prefilled prompt)", "",
            *_table(head, body, "rrlrrrrrr")]


def md_hf_prefill(rows: list[dict]) -> list[str]:
    head = ["tokens", "ours ms (median / min)", "LlamaModel ms (median / min)", "ours / HF", "max abs diff"]
    body = [[r["n_tokens"], f"{r['ours']['median_ms']:.1f} / {r['ours']['min_ms']:.1f}",
             f"{r['hf']['median_ms']:.1f} / {r['hf']['min_ms']:.1f}", f"{r['ratio_median']:.3f}",
             f"{r['max_abs_diff']:.2e}"] for r in rows]
    return ["## Dense decoder prefill vs transformers.LlamaModel (same weights and inputs_embeds, no cache)", "",
            *_table(head, body, "rrrrr")]


def md_hf_decode(h: dict) -> list[str]:
    n = h["new_tokens"]
    return ["## Batch-1 decode step: pmod.generate vs LlamaForCausalLM.generate (same weights)", "",
            (f"Time from the 1st to the {n}th new token / {n - 1} (streamer stamps, prefill excluded), prompt of "
            f"{h['prompt_tokens']} text tokens: ours {h['ours_step_ms']:.2f} ms, HF {h['hf_step_ms']:.2f} ms "
            f"(medians), ratio {h['step_ratio']:.3f} (from mins {h['step_ratio_min']:.3f}); whole calls "
            f"{h['ours_generate']['median_ms']:.0f} vs {h['hf_generate']['median_ms']:.0f} ms; greedy tokens equal: "
            f"{100 * h['tokens_match']:.0f} %."), "",
            (f"Floor (`floor_step`: each weight matrix times one token plus attention over the cache, nothing else): "
             f"{h['floor_step_ms']:.2f} ms. Above it: ours {h['ours_overhead_ms']:.2f} ms, HF {h['hf_overhead_ms']:.2f} ms "
             f"per step (ratio {h['overhead_ratio']:.2f}). Where the floor is most of a step, the step is bound by "
             "memory bandwidth (reading the weights once per token) and no loop can be much faster than it."), "",
            *([f"With `cuda_graph=True` (one captured graph per step): {h['ours_graph_step_ms']:.2f} ms a step, "
               f"{h['graph_step_ratio']:.3f} of HF's; tokens equal to the eager loop's: {bool(h['graph_tokens_match'])}.", ""]
              if "graph_step_ratio" in h else [])]


def md_batching(b: dict) -> list[str]:
    return ["## Batched vs one-by-one generation (dense, text prompts)", "",
            (f"{b['prompts']} prompts of {b['prompt_lens'][0]}–{b['prompt_lens'][-1]} tokens, {b['new_tokens']} new "
            f"tokens each: batched {b['batched']['median_ms']:.0f} ms, one by one {b['one_by_one']['median_ms']:.0f} "
            f"ms, speed-up {b['speedup_median']:.2f} (from mins {b['speedup_min']:.2f}); tokens equal: "
            f"{b['tokens_equal']}."), ""]


def md_packing(rows: list[dict]) -> list[str]:
    r0 = rows[0]

    def cell(v):
        return "-" if v is None else f"{v['median_ms']:.1f} ({v['speedup_median']:.2f}×), diff {v['max_abs_diff']:.1e}"

    head = ["model", "packed ms", "padded, ours (rows filled) ms", "padded, HF LlamaModel + mask ms"]
    body = [[r["model"], f"{r['packed']['median_ms']:.1f}", cell(r["padded_ours"]), cell(r.get("padded_hf"))]
            for r in rows]
    return [(f"## Packed vs padded decoder (images per row {r0['images_per_row']}, rows of {r0['row_tokens']} "
             f"tokens: {r0['packed_tokens']} packed, {r0['padded_tokens']} padded)"), "", *_table(head, body, "lrrr")]


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write `path` whole or not at all (temp file in the same folder, fsync, rename): a run stopped mid-write
    leaves the previous version."""
    import os
    import tempfile

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~umask)  # what open() would give, not mkstemp's 0600
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _md_section(name: str, results: Any) -> list[str]:
    from pmod.bench.registry import get_section

    try:
        fmt = get_section(name).markdown
    except ValueError:
        fmt = None
    if fmt is None:  # a section without a formatter still shows what it measured
        import json

        return [f"## {name}", "", "```json", json.dumps(results, indent=1, default=str), "```", ""]
    return fmt(results)


def write_markdown(res: dict, path: Path) -> str:
    """results.md: the run's metadata, one table per finished section (in run order), then the checks."""
    m = res["meta"]
    lines = _md_meta(m)
    pending = [s for s in m.get("sections", []) if s not in res]
    if pending:
        lines += [f"**Partial run**: {', '.join(pending)} not finished (the sections below are complete).", ""]
    for name in m.get("sections", [k for k in res if k not in ("meta", "checks")]):
        if res.get(name):
            lines += _md_section(name, res[name])
    body = [[c["name"], f"{c['value']:.3f}", c["bar"], "yes" if c["pass"] else "**no**", c["what"]]
            for c in res.get("checks", [])]
    lines += ["## Checks", "", *_table(["check", "measured", "bar", "pass", "what"], body, "lrlll")]
    text = "\n".join(lines)
    atomic_write(path, text)
    return text


def plot_speedup(prefill_rows: list[dict], path: Path, ideal: dict[int, list[tuple[float, float]]] | None = None,
                 title: str = "", note: str = "") -> None:
    """speedup.png: measured prefill speed-up vs kept-token ratio per prompt size, against the ideal (the FLOPs
    ratio). `ideal`: {n_vision: [(kept ratio, ideal speed-up)]}, a curve over constant ratios drawn whatever the run
    measured (default: the ideal of the measured rows). The legend sits below the axes, `note` (machine, date) at
    the bottom."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 6.2))
    for i, n_v in enumerate(sorted({r["n_vision"] for r in prefill_rows})):
        rows, color = [r for r in prefill_rows if r["n_vision"] == n_v], f"C{i}"
        line = sorted((r for r in rows if r["model"] != "prd"), key=lambda r: r["kept_ratio"])  # dense + constant
        curve = (ideal or {}).get(n_v) or [(r["kept_ratio"], r["ideal_speedup"]) for r in line]
        ax.plot(*zip(*sorted(curve)), "--", color=color, lw=1.6, alpha=0.9, zorder=1,
                label=f"{n_v} vision tokens: ideal (FLOPs ratio, constant ratios)")
        ax.plot([r["kept_ratio"] for r in line], [r["speedup_median"] for r in line], "o-", color=color, zorder=3,
                label=f"{n_v}: measured, dense and deep_all at constant ratios")
        for r in (r for r in rows if r["model"] == "prd"):
            ax.plot(r["kept_ratio"], r["ideal_speedup"], "x", color=color, markersize=9, mew=2, zorder=4,
                    label=f"{n_v}: ideal of the default PRD schedule")
            ax.plot(r["kept_ratio"], r["speedup_median"], "*", color=color, markersize=14, zorder=4,
                    label=f"{n_v}: measured, default PRD schedule")
    ax.set_xlabel("kept-token ratio (vision tokens processed per layer / all, mean over layers)")
    ax.set_ylabel("prefill speed-up over dense (median)")
    ax.set_title(title or "p-MoD prefill speed-up over dense vs kept-token ratio", fontsize=11)
    ax.set_ylim(bottom=min(0.9, ax.get_ylim()[0]))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, frameon=False)
    if note:
        import textwrap

        note = "\n".join(textwrap.wrap(note, 150))
        fig.text(0.01, 0.01, note, fontsize=7, color="0.35", ha="left", va="bottom")
    fig.tight_layout(rect=(0, 0.025 * (1 + note.count("\n")) if note else 0, 1, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write(path, buf.getvalue())
