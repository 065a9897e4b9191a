"""lmms-eval end to end, offline: the real CLI (`python -m lmms_eval --model pmod`) in a subprocess on the shipped
pmod_synth task with a tiny checkpoint, then our table; its cost columns against the accounting modules; an
interrupted run continued from the plugin's journal; and the plugin's requests in process (batched = one by one,
log-likelihood = prefill + decode)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer

pytest.importorskip("lmms_eval", reason="the eval extra (pip install -e .[eval]) is not installed")

import pmod
from pmod.evaluation.run import (
    ModelRun,
    latest_results,
    lmms_eval_command,
    read_journal,
    run_lmms_eval,
    synth_task_folder,
    write_tiny_synth,
)
from pmod.multimodal.processor import PmodProcessor

N = 12


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny p-MoD checkpoint with its tokenizer, a 12-sample local dataset, and one real lmms-eval run."""
    root = tmp_path_factory.mktemp("eval")
    ckpt, dense, data, out = root / "ckpt", root / "dense", root / "data", root / "out"
    for folder, model in ((ckpt, tiny_model(layers=4)), (dense, tiny_model(layers=4, schedule="none"))):
        model.save_pretrained(folder)
        PmodProcessor(tiny_tokenizer(), model.config).save_pretrained(folder)
    write_tiny_synth(data, n=N)
    tasks_dir = synth_task_folder(out, data)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(root / "hf")}
    cmd = lmms_eval_command(str(ckpt), ["pmod_synth"], out / "ckpt", batch_size=5, include_path=[tasks_dir],
                            model_args={"dtype": "float32", "device": "cpu"})
    assert cmd[1:5] == ["-m", "lmms_eval", "--model", "pmod"]  # lmms-eval's own CLI; the model found by entry point
    results = run_lmms_eval(cmd, out / "ckpt", env=env, echo=False)
    return {"ckpt": ckpt, "dense": dense, "data": data, "out": out, "env": env, "cmd": cmd, "results": results, "tasks_dir": tasks_dir}


def _table(setup) -> dict:
    from pmod.cli import main

    rc = main(["eval", "--model", str(setup["ckpt"]), "--tasks", "pmod_synth", "--output", str(setup["out"]),
               "--synth-data", str(setup["data"]), "--table-only"])
    assert rc == 0
    return json.loads((setup["out"] / "results.json").read_text())


def test_cli_run_gives_scores_and_table(setup):
    res = json.loads(setup["results"].read_text())
    acc = res["results"]["pmod_synth"]["exact_match,none"]
    assert 0.0 <= acc <= 1.0  # a random model: near zero, but a score
    table = _table(setup)
    (model,) = table["models"]
    assert model["scores"]["pmod_synth"] == pytest.approx(100 * acc)
    md = (setup["out"] / "results.md").read_text()
    assert "| Synth | exact_match |" in md and "KV vs dense" in md
    assert (setup["out"] / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert model["costs"]["pmod_synth"]["requests"] == N


def test_cost_columns_equal_the_accounting_modules(setup):
    """Per sample, the same prompt through the processor: measure_efficiency, count_flops, kv_cache_bytes and the
    bytes of a real prefill cache; their means are the table's columns."""
    from pmod.evaluation.efficiency import measure_efficiency

    costs = _table(setup)["models"][0]["costs"]["pmod_synth"]
    model = pmod.from_pretrained(setup["ckpt"], dtype=torch.float32, device="cpu").eval()
    proc = pmod.load_processor(setup["ckpt"])
    cfg, rows = model.config, [json.loads(line) for line in (setup["data"] / "test.jsonl").read_text().splitlines()]
    want = {k: 0.0 for k in ("tflops", "tflops_dense", "tflops_paper", "kv_bytes", "kv_bytes_dense", "kept_ratio")}
    for r in rows:
        inputs = proc(r["question"], images=[setup["data"] / r["image"]])
        _, layout = model.prepare(inputs["input_ids"], inputs["images"], inputs["image_sizes"], inputs["attention_mask"])
        eff = measure_efficiency(cfg, layout, None)
        kv = pmod.kv_cache_bytes(cfg, n_vision=eff.n_vision, n_text=eff.n_text, dtype=torch.float32, convention="complete")
        with torch.no_grad():
            cache = model(**inputs, use_cache=True).past_key_values
        assert cache.nbytes() == kv.total  # the plan is what a prefill actually holds
        assert kv.total / kv.dense_total == pytest.approx(eff.kv_ratio)
        paper = pmod.count_flops(cfg, n_vision=eff.n_vision, n_text=eff.n_text, convention="paper")
        for k, v in (("tflops", eff.tflops), ("tflops_dense", eff.tflops_dense), ("tflops_paper", paper.total / 1e12),
                     ("kv_bytes", kv.total), ("kv_bytes_dense", kv.dense_total), ("kept_ratio", eff.kept_ratio)):
            want[k] += v / len(rows)
    for k, v in want.items():
        assert costs[k] == pytest.approx(v, rel=1e-9), k
    assert costs["kept_ratio"] < 1.0 and costs["kv_ratio"] < 1.0  # p-MoD layers did drop vision tokens


def test_interrupted_run_continues_and_compares_with_dense(setup):
    """Cut the p-MoD journal as an interruption would (after one batch, mid-line) and run `pmod eval` again with
    the dense twin beside: only the missing p-MoD requests are computed, the score is the uninterrupted one, and
    the table puts both side by side, the dense model at 100 % of its own cost."""
    from pmod.cli import main

    folder = setup["out"] / "ckpt"
    journal = folder / "pmod_requests.rank0.jsonl"
    lines = journal.read_text().splitlines(keepends=True)
    journal.write_text("".join(lines[:5]) + lines[5][:40])
    first = json.loads(setup["results"].read_text())["results"]["pmod_synth"]["exact_match,none"]
    env = setup["env"]
    old = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HOME")}
    os.environ.update({k: env[k] for k in old})
    try:
        rc = main(["eval", "--model", str(setup["ckpt"]), "--compare", str(setup["dense"]), "--tasks", "pmod_synth",
                   "--output", str(setup["out"]), "--synth-data", str(setup["data"]), "--batch-size", "5",
                   "--dtype", "float32", "--device", "cpu", "--no-check", "--quiet"])
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    assert rc == 0
    again = json.loads(latest_results(folder).read_text())["results"]["pmod_synth"]["exact_match,none"]
    assert again == first
    new_lines = journal.read_text().splitlines()[6:]  # 5 whole lines, then the cut one
    assert len(new_lines) == N - 5  # 5 served from the journal, 7 recomputed
    assert len(read_journal(folder)) == N

    table = json.loads((setup["out"] / "results.json").read_text())
    pm, dense = (m["costs"]["pmod_synth"] for m in table["models"])
    assert [m["label"] for m in table["models"]] == ["ckpt", "dense"]
    assert dense["requests"] == N and dense["kept_ratio"] == dense["kv_ratio"] == dense["flops_ratio"] == 1.0
    assert pm["kv_ratio"] < 1.0 and pm["tflops"] < dense["tflops"]
    assert pm["tflops_dense"] == pytest.approx(dense["tflops"])  # the same prompts through the dense twin
    assert "| ckpt score |" in (setup["out"] / "results.md").read_text()
    assert "| dense score |" in (setup["out"] / "results.md").read_text()


# --- the plugin in process --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def plugin(setup, tmp_path_factory):
    from pmod.evaluation.lmms_plugin import PmodLmms

    lm = PmodLmms(pretrained=str(setup["ckpt"]), dtype="float32", device="cpu", batch_size=3,
                  log=str(tmp_path_factory.mktemp("journal")), resume=False)
    from PIL import Image

    rows = [json.loads(line) for line in (setup["data"] / "test.jsonl").read_text().splitlines()][:4]
    docs = [{**r, "pil": Image.open(setup["data"] / r["image"]).convert("RGB")} for r in rows]
    docs.append({"question": "how many shapes ?", "answer": "two", "pil": None})  # text only
    lm.task_dict = {"t": {"test": docs}}
    return lm


def _instances(kind: str, contexts: list[str], second: list):
    from lmms_eval.api.instance import Instance

    vis = lambda d: [d["pil"]] if d["pil"] is not None else []
    return [Instance(request_type=kind, arguments=(c, s, vis, i, "t", "test"), idx=0,
                     metadata={"task": "t", "doc_id": i, "repeats": 1}) for i, (c, s) in enumerate(zip(contexts, second))]


def test_generate_until_batched_equals_one_by_one(plugin):
    docs = plugin.task_dict["t"]["test"]
    gk = {"until": ["?"], "max_new_tokens": 6, "temperature": 0, "do_sample": False}
    reqs = _instances("generate_until", [d["question"] for d in docs], [dict(gk) for _ in docs])
    batched = [r.text for r in plugin.generate_until(reqs)]
    plugin.batch_size_per_gpu = 1
    try:
        single = [r.text for r in plugin.generate_until(reqs)]
    finally:
        plugin.batch_size_per_gpu = 3
    assert batched == single and all("?" not in t for t in batched)
    assert reqs[0].args[1] == gk  # the request's settings are not modified


def test_loglikelihood_equals_prefill_then_decode(plugin):
    """log P(continuation | context) from one forward over the whole sequence (batched, right-padded, merged
    positions) against a prefill of the context and one decode step per continuation token."""
    docs = plugin.task_dict["t"]["test"]
    conts = [" red", " yes no", " two", " blue green red", " one"]
    reqs = _instances("loglikelihood", [d["question"] for d in docs], conts)
    got = plugin.loglikelihood(reqs)
    model, proc = plugin.model, plugin.processor
    for d, cont, (lp, greedy) in zip(docs, conts, got):
        images = [d["pil"]] if d["pil"] is not None else []
        ctx = proc.apply_template([{"role": "user", "content": ("<image>\n" if images else "") + d["question"]}])
        target = proc.encode(ctx + cont)[len(proc.encode(ctx)):]
        inputs = proc(ctx, images=images or None, chat=False)
        with torch.no_grad():
            out = model(**inputs, use_cache=True, cache_reserve=len(target), logits_to_keep="last")
            logits, cache, ref, argmax = out.logits, out.past_key_values, 0.0, []
            for t in target:
                logp = torch.log_softmax(logits[0].float(), -1)
                ref += float(logp[t])
                argmax.append(int(logp.argmax()))
                logits = model.decode_step(torch.tensor([t]), cache)
        assert lp == pytest.approx(ref, abs=1e-4)
        assert greedy == (argmax == target)
    logged = [r for r in read_journal(Path(plugin.journal.path).parent) if r["reqtype"] == "loglikelihood"]
    assert sorted(r["doc_id"] for r in logged) == list(range(len(docs)))
    text_only = next(r for r in logged if r["doc_id"] == 4)
    assert text_only["n_vision"] == 0 and text_only["kept_ratio"] is None and text_only["response"] == list(got[4])


def test_unknown_model_args_and_beams_are_refused(setup):
    from pmod.evaluation.lmms_plugin import PmodLmms
    from pmod.evaluation.requests import generation_settings

    with pytest.raises(ValueError, match="unknown model_args.*colour"):
        PmodLmms(pretrained=str(setup["ckpt"]), colour="red")
    with pytest.raises(ValueError, match="num_beams=4"):
        generation_settings({"num_beams": 4}, 16)


def test_lmms_eval_finds_the_plugin_by_entry_point():
    from lmms_eval.models import get_model

    assert get_model("pmod").__name__ == "PmodLmms"
    assert sys.modules["pmod.evaluation.lmms_plugin"].PmodLmms.is_simple
    assert ModelRun("a", "b").label == "a"


def test_prefix_cache_reuses_one_image_across_questions(setup, plugin, tmp_path):
    """prefix_cache_mb: several questions about one image prefill it once (misses = images, hits = the other
    questions, in the journal), and every answer equals the plugin's without a prefix cache."""
    from PIL import Image

    from pmod.evaluation.lmms_plugin import PmodLmms

    lm = PmodLmms(pretrained=str(setup["ckpt"]), dtype="float32", device="cpu", batch_size=3, log=str(tmp_path),
                  resume=False, prefix_cache_mb=4)
    pils = [Image.open(setup["data"] / plugin.task_dict["t"]["test"][i]["image"]).convert("RGB") for i in (0, 1)]
    questions = ["what color ?", "how many ?", "what shape ?"]
    docs = [{"question": q, "pil": p} for p in pils for q in questions] + [{"question": "yes ?", "pil": None}]
    lm.task_dict = plugin.task_dict = {"t": {"test": docs}}
    gk = {"until": ["?"], "max_new_tokens": 5, "temperature": 0, "do_sample": False}
    reqs = _instances("generate_until", [d["question"] for d in docs], [dict(gk) for _ in docs])
    got = [r.text for r in lm.generate_until(reqs)]
    assert got == [r.text for r in plugin.generate_until(reqs)]
    logged = sorted(read_journal(tmp_path), key=lambda r: r["doc_id"])
    assert [r["prefix_cache"] for r in logged].count("miss") == 2 and [r["prefix_cache"] for r in logged].count("hit") == 4
    assert logged[-1]["prefix_cache"] == "none"
    st = lm.prefixes.stats()
    assert (st.hits, st.misses, st.entries) == (4, 2, 2) and 0 < st.bytes <= 4 * 2**20
    assert all(r["prefilled_tokens"] < r["n_text"] for r in logged if r["prefix_cache"] == "hit")
