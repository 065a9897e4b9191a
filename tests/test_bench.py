"""`pmod bench` at the tiny preset: the bookkeeping (FLOPs, KV bytes, tokens/s, parities, outputs), never timings."""
from __future__ import annotations

import json
import statistics

import pytest
import torch

from pmod import bench
from pmod.bench import calls as bench_calls
from pmod.flops import count_flops, kv_cache_bytes

ON_CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: at these sizes a second one only adds synchronisation (and stalls on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, one_thread):
    """One CLI run at the tiny preset: (results dict, stdout lines, output folder)."""
    import contextlib
    import io

    from pmod.cli import main

    out = tmp_path_factory.mktemp("bench")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["bench", "--preset", "tiny", "--device", "cpu", "--threads", "1", "--output", str(out)])
    assert rc == 0
    return json.loads((out / "results.json").read_text()), buf.getvalue().strip().splitlines(), out


def test_outputs_and_last_line_json(tiny_run):
    res, lines, out = tiny_run
    assert (out / "results.md").read_text().startswith("# pmod bench")
    assert (out / "speedup.png").read_bytes()[:4] == b"\x89PNG"
    last = json.loads(lines[-1])
    assert last["preset"] == "tiny" and set(last["checks"]) == {c["name"] for c in res["checks"]}
    assert set(bench.SECTIONS) <= set(res) and res["meta"]["routing_nontrivial"] is True


def test_every_section_ticks_its_declared_calls(tiny_run):
    """Each section's progress bar is as long as the calls it makes (`Section.calls` is kept honest)."""
    res = tiny_run[0]
    assert res["meta"]["complete"] is True and res["meta"]["finished"] == list(bench.SECTIONS)
    assert all(done == total > 0 for done, total in res["meta"]["progress"].values()), res["meta"]["progress"]


def test_plot_has_an_ideal_curve_over_constant_ratios():
    """The ideal line does not depend on the sweep a run measured: 20 constant ratios at the cpu preset's shapes,
    rising as fewer tokens are kept, 1 at ratio 1 but for the routers' own matmuls."""
    curve = bench.ideal_curve(bench.PRESETS["cpu"], 1)
    assert len(curve) == 20 and curve[-1][0] == 1.0 and curve[-1][1] == pytest.approx(1.0, abs=1e-3)
    speedups = [s for _, s in sorted(curve)]
    assert all(a >= b for a, b in zip(speedups, speedups[1:])) and speedups[0] > 2.5


def test_a_registered_section_runs_and_is_reported(tmp_path, monkeypatch):
    """A new section slots in through the registry: it runs after the built-ins, ticks its bar, lands in
    results.json and results.md (a generic block when it has no formatter)."""
    from pmod.bench import registry
    from pmod.bench.timing import time_interleaved

    def extra(ctx):
        t = time_interleaved({"a": lambda: 1, "b": lambda: 2}, ctx.device, ctx.warmup, ctx.reps)
        return {"calls": {k: len(v.times_ms) for k, v in t.items()}, "layers": len(ctx.dense.language_model.layers)}

    monkeypatch.setitem(registry._REGISTRY, "extra", bench.Section("extra", extra, lambda c: 2 * c.rounds))
    assert bench.section_names("cpu")[-1] == "extra"
    seen = []
    res = bench.run_benchmark(bench.resolve_preset("tiny"), "cpu", ["batching", "extra"], log=lambda s: None,
                              on_section=lambda r: seen.append(list(r["meta"]["finished"])), progress=False)
    assert seen == [["batching"], ["batching", "extra"]]
    assert res["extra"] == {"calls": {"a": 1, "b": 1}, "layers": 4} and res["meta"]["progress"]["extra"] == [2, 2]
    bench.write_markdown(res, tmp_path / "results.md")
    assert "## extra" in (tmp_path / "results.md").read_text()


def test_killed_run_keeps_its_finished_sections(tmp_path):
    """SIGKILL after the first section: results.json and results.md hold it, whole, and say the run is partial."""
    import os
    import signal
    import subprocess
    import sys

    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "pmod.bench", "--preset", "tiny", "--device", "cpu", "--threads", "1",
           "--reps", "25", "--output", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:
            if "prefill done" in line:
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    res = json.loads((out / "results.json").read_text())
    assert res["meta"]["complete"] is False and res["meta"]["finished"][0] == "prefill"
    assert len(res["meta"]["finished"]) < len(bench.SECTIONS) and "packing" not in res
    assert len(res["prefill"]) == 5 and {c["name"] for c in res["checks"]} >= {"prefill_vs_ideal@9"}
    assert "**Partial run**" in (out / "results.md").read_text()
    assert (out / "speedup.png").read_bytes()[:4] == b"\x89PNG"
    assert not list(out.glob(".*.tmp"))  # no half-written file left behind
    umask = os.umask(0)
    os.umask(umask)
    assert (out / "results.json").stat().st_mode & 0o777 == 0o666 & ~umask  # as open() makes files, not 0600


def test_prefill_bookkeeping(tiny_run):
    res = tiny_run[0]
    preset = bench.PRESETS["tiny"]
    names = {r["model"] for r in res["prefill"]}
    assert names == {"dense", "prd", *(f"deep_all@{r:g}" for r in preset.sweep)}
    for r in res["prefill"]:
        assert r["kv_lengths_match_flops"], r
        mod = bench.schedules(preset).get(r["model"])
        cfg = preset.config(mod)
        n_img = r["n_vision"] // cfg.vision.num_patches
        rep = count_flops(cfg, r["n_vision"], r["n_text"], "complete", include_vision=True, n_images=n_img,
                          last_only=True)
        assert r["ideal_speedup"] == pytest.approx(rep.dense_total / rep.total, rel=1e-12)
        assert r["fraction_of_ideal"] == pytest.approx(r["speedup_median"] / r["ideal_speedup"])
        # tokens/s counts the prompt the preset asks for, over the median of the raw samples (not the summary's)
        assert (r["n_vision"], r["n_text"]) == (n_img * cfg.vision.num_patches, preset.n_text) and n_img in preset.images
        assert r["tokens_per_s"] * statistics.median(r["times_ms"]) / 1e3 == pytest.approx(r["n_vision"] + r["n_text"])
        if r["model"] == "dense":
            assert r["speedup_median"] == 1.0 and r["ideal_speedup"] == 1.0 and r["kept_ratio"] == 1.0


def test_decode_bookkeeping(tiny_run):
    res = tiny_run[0]
    preset = bench.PRESETS["tiny"]
    for r in res["decode"]:
        # tokens/s counts batch x steps new tokens as the preset asks for, over the median of the raw samples
        assert r["batch"] in preset.decode_batches and r["steps"] == preset.decode_steps
        assert r["tokens_per_s"] * statistics.median(r["times_ms"]) / 1e3 == pytest.approx(r["batch"] * r["steps"])
        cfg = preset.config(bench.schedules(preset)["prd"] if r["model"] == "prd" else None)
        kv = kv_cache_bytes(cfg, r["n_vision"], r["n_text"], torch.float32, "complete", batch=r["batch"])
        assert r["kv_bytes"] == kv.total  # the cache holds exactly the planned tokens, after a rewind
        assert r["kv_ratio"] == pytest.approx(kv.total / kv.dense_total)
        if r["model"] == "prd":
            assert r["kv_vision_ratio"] == pytest.approx(kv.vision_fraction_int)


def test_parities(tiny_run):
    res = tiny_run[0]
    assert all(r["max_abs_diff"] < 1e-4 for r in res["hf_prefill"])
    assert res["hf_decode"]["tokens_match"] == 1.0
    assert res["batching"]["tokens_equal"] is True
    for r in res["packing"]:
        assert r["padded_tokens"] > r["packed_tokens"] == sum(r["row_tokens"])
        assert all(r[v]["max_abs_diff"] < 1e-4 for v in ("padded_ours", "padded_hf") if v in r)


def test_time_interleaved_order_and_counts():
    calls = []
    fns = {n: (lambda n=n: calls.append(n) or n) for n in "abc"}
    t = bench.time_interleaved(fns, "cpu", warmup=1, reps=2)
    assert calls == list("abc") * 3
    assert all(len(v.times_ms) == 2 and v.result == k and v.min_ms <= v.median_ms for k, v in t.items())


def test_shared_weights_and_routers():
    preset = bench.PRESETS["tiny"]
    dense = bench.build_dense(preset, "cpu")
    pm = bench.with_routers(dense, bench.schedules(preset)["prd"], preset.router_std)
    hf = bench.hf_llama(dense)
    assert pm.language_model.layers is dense.language_model.layers and pm.lm_head is dense.lm_head
    ours = dense.language_model.layers[0].mlp.up_proj.weight
    assert hf.model.layers[0].mlp.up_proj.weight.data_ptr() == ours.data_ptr()
    assert len(pm.language_model.routers) and all(r.weight.abs().sum() > 0 for r in pm.language_model.routers.values())
    assert all(torch.isfinite(p).all() for p in dense.parameters())


def test_fill_keeps_rows_and_images():
    cfg = bench.PRESETS["tiny"].config()
    a = bench.make_prompt(cfg, [0, 2, 1], 6, "cpu", seed=1)
    b = bench.make_prompt(cfg, [0, 2, 1], 6, "cpu", seed=1, fill=True)
    assert torch.equal(a.images, b.images) and len(set(b.merged_lens)) == 1
    for row in range(3):
        n = int(a.attention_mask[row].sum())
        assert torch.equal(a.input_ids[row, :n], b.input_ids[row, :n])


def test_replicate_and_rewind_are_exact():
    preset = bench.PRESETS["tiny"]
    with torch.inference_mode():
        dense = bench.build_dense(preset, "cpu")
        pm = bench.with_routers(dense, bench.schedules(preset)["prd"], preset.router_std)
        out = bench.prefill(pm, bench.make_prompt(pm.config, [1], 8, "cpu"), reserve=4)
        c3 = bench.replicate_rows(out.past_key_values, 3)
        snap = bench_calls._snapshot(c3)
        kv3 = c3.nbytes()
        first = bench.decode_loop(pm, c3, out.logits.expand(3, -1), 4)
        bench_calls._rewind(c3, snap)
        again = bench.decode_loop(pm, c3, out.logits.expand(3, -1), 4)
    assert out.past_key_values.batch_size == 1 and kv3 == 3 * out.past_key_values.nbytes()
    assert torch.equal(first, again) and len(set(first.tolist())) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not ON_CUDA, reason="needs a CUDA device")
def test_tiny_run_on_cuda():
    preset = bench.resolve_preset("tiny", warmup=1)
    res = bench.run_benchmark(preset, "cuda", log=lambda s: None)
    assert res["meta"]["attn_backend"] == "sdpa"  # fp32: flash-attn takes fp16/bf16 only
    assert all(r["kv_lengths_match_flops"] for r in res["prefill"])
    assert all(r["peak_bytes"] is not None and r["peak_bytes"] > 0 for r in res["prefill"])
    assert all(r["max_abs_diff"] < 1e-3 for r in res["hf_prefill"])
    assert {c["name"] for c in res["checks"]} >= {"decode_step_vs_hf_generate", "prefill_vs_ideal@9"}


@pytest.mark.flash
@pytest.mark.skipif(not ON_CUDA, reason="needs a CUDA device")
def test_flash_path_matches_sdpa_within_twice_its_error():
    """bf16 prefill logits through the flash backend vs an fp32 eager oracle: error <= 2x the SDPA path's + 1e-3;
    decode through flash_attn_with_kvcache runs on the harness's cache (finite logits, one token per row)."""
    pytest.importorskip("flash_attn")
    preset = bench.resolve_preset("tiny")
    prompt = bench.make_prompt(preset.config(), [1], preset.n_text, "cuda")
    logits, tokens = {}, {}
    with torch.inference_mode():
        dense = bench.build_dense(dataclass_replace(preset, dtype=torch.bfloat16), "cuda", attn_backend="sdpa")
        oracle = bench.build_dense(preset, "cuda", attn_backend="eager")
        oracle.load_state_dict({k: v.float() for k, v in dense.state_dict().items()})
        ref = bench.prefill(oracle, prompt).logits
        for backend in ("sdpa", "flash"):
            dense.attn_backend = backend
            out = bench.prefill(dense, prompt, reserve=4)
            logits[backend] = out.logits.float()
            tokens[backend] = bench.decode_loop(dense, out.past_key_values, out.logits, 4)
            assert torch.isfinite(dense.decode_step(tokens[backend], out.past_key_values)).all()
    err = {b: (v - ref).abs().max().item() for b, v in logits.items()}
    assert err["flash"] <= 2 * err["sdpa"] + 1e-3, err
    assert tokens["flash"].shape == tokens["sdpa"].shape == (1,)


def dataclass_replace(preset, **kw):
    import dataclasses

    return dataclasses.replace(preset, **kw)


def test_the_7b_bench_runs_the_released_7b_decoder():
    """gpu-7b is LLaVA-1.5-7B's decoder as `PmodConfig.from_name` gives it (layer count, widths, heads, vocabulary)."""
    from pmod.config import PmodConfig

    assert bench.PRESETS["gpu-7b"].config().text == PmodConfig.from_name("llava-1.5-7b").text


def test_the_extras_run_only_when_named():
    """`kernels` and `train_step` (the kernels' and the training step's benches, now sections) stay out of the
    default run and, named, run on the tiny preset: every kernel timed forward and backward, both models stepped."""
    assert {"kernels", "train_step"} <= set(bench.section_names())
    assert not {"kernels", "train_step"} & set(bench.section_names("cpu") + bench.section_names("cuda"))
    res = bench.run_benchmark(bench.resolve_preset("tiny"), "cpu", ["kernels", "train_step"], log=lambda s: None,
                              progress=False)
    assert set(res["kernels"]["cases"]) == {"router_weights", "gather_rows", "string_merge"}
    assert all(v["torch"]["fwd_bwd_ms"] > 0 for v in res["kernels"]["cases"].values())
    assert res["meta"]["progress"]["kernels"][0] == res["meta"]["progress"]["kernels"][1]  # declared calls were made
    t = res["train_step"]
    assert t["dense"]["median_ms"] > 0 and t["pmod"]["median_ms"] > 0 and 0 < t["prefill_flops_ratio"] < 1
