"""The engine driven step by step (no HTTP, no thread): requests join the running batch at a step boundary and
leave when done, one packed prefill admits all that wait, answers equal `model.generate` alone; an exception in
one request fails that request only."""
from __future__ import annotations

import pytest
import torch
from serve_util import PMOD, QUESTIONS, Reference, write_images

from pmod.serve.engine import Engine, Job, QueueFull
from pmod.serve.inputs import request_inputs
from pmod.serve.protocol import parse_chat_request


@pytest.fixture(scope="module")
def ref():
    return Reference(PMOD)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("engine-images"), 4)


def make_job(ref, question, image, max_tokens, **kw):
    from pmod.multimodal.images import load_image

    content = question if image is None else [{"type": "image_url", "image_url": {"url": "x"}}, {"type": "text", "text": question}]
    req = parse_chat_request({"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens})
    inputs, n, mt = request_inputs(ref.model, ref.processor, req, [load_image(image)] if image else [])
    events = []
    return Job(inputs, n, mt, emit=events.append, **kw), events


def answer(events):
    assert events[-1]["type"] == "done", events[-1]
    assert "".join(e["text"] for e in events if e["type"] == "delta") == events[-1]["text"]
    return events[-1]["text"]


def test_rows_join_at_step_boundaries_and_answers_equal_generate(ref, images):
    eng = Engine(ref.model, ref.processor, max_batch=8)
    cases = [(QUESTIONS[3], images[0], 9), (QUESTIONS[0], None, 5), (QUESTIONS[1], images[1], 12), (QUESTIONS[3], images[2], 3)]
    jobs = [make_job(ref, q, img, n, ignore_eos=True) for q, img, n in cases]
    eng.submit(jobs[0][0])
    eng.step()  # prefill of job 0 and its first token
    eng.step()  # job 0 decodes alone
    assert eng.metrics.counters["prefill_batches"] == 1 and eng._cache.batch_size == 1
    for job, _ in jobs[1:]:
        eng.submit(job)
    eng.step()  # one packed prefill admits the three waiting jobs; then one decode step for all four rows
    assert eng.metrics.counters["prefill_batches"] == 2 and eng._cache.batch_size == 4
    lens = eng._cache.layer_lengths()  # [L, B]: rows of different lengths, MoD layers shorter than dense ones
    assert len(set(lens[0].tolist())) > 1 and (lens[-1] < lens[0]).any()
    g = eng.metrics.gauges  # KV held = what the cache holds; dense = every layer holding each row's full length
    per_token = sum(eng._cache.token_nbytes(i) for i in range(eng._cache.num_layers))
    assert g["kv_cache_bytes"] == eng._cache.nbytes() < g["kv_cache_dense_bytes"] == per_token * int(eng._cache.positions.sum())
    assert g["running_rows"] == 4
    steps = 3
    while eng._rows:
        eng.step()
        steps += 1
    assert steps == 1 + 12  # job 2 (12 tokens, joined at step 3) decides the count: the others shared its steps
    for (q, img, n), (_, ev) in zip(cases, jobs):
        ref_tokens = ref.model.generate(**ref.processor([{"role": "user", "content": ("<image>\n" if img else "") + q}],
                                        images=[__import__("pmod").multimodal.images.load_image(img)] if img else None),
                                        max_new_tokens=n, eos_token_id=[])
        assert answer(ev) == ref.processor.decode(ref_tokens[0])
        assert ev[-1]["usage"]["completion_tokens"] == n and ev[-1]["finish_reason"] == "length"


def test_sixteen_waiting_requests_share_every_decode_step(ref, images):
    """The deterministic count behind the throughput claim: 16 requests of 8 tokens take 1 prefill + 7 decode
    steps, where one at a time they take 16 + 16 * 7."""
    eng = Engine(ref.model, ref.processor, max_batch=16)
    jobs = [make_job(ref, QUESTIONS[i % 4], images[i % 4] if i % 2 else None, 8, ignore_eos=True) for i in range(16)]
    for job, _ in jobs:
        eng.submit(job)
    while eng._rows or eng._pending:
        eng.step()
    c = eng.metrics.counters
    assert (c["prefill_batches"], c["decode_steps"], c["generation_tokens"]) == (1, 7, 16 * 8)
    assert eng.metrics.requests["ok"] == 16 and eng._cache is None


def test_max_batch_holds_the_rest_in_the_queue(ref):
    eng = Engine(ref.model, ref.processor, max_batch=2, max_queue=2)
    jobs = [make_job(ref, QUESTIONS[0], None, 4, ignore_eos=True) for _ in range(4)]
    eng.submit(jobs[0][0])
    eng.submit(jobs[1][0])
    with pytest.raises(QueueFull, match=r"2 requests are waiting \(--max-queue 2\)"):
        eng.submit(make_job(ref, QUESTIONS[0], None, 4)[0])
    eng.step()  # both admitted: the queue is empty again
    assert len(eng._rows) == 2 and not eng._pending
    eng.submit(jobs[2][0])
    eng.submit(jobs[3][0])
    eng.step()
    assert len(eng._rows) == 2 and len(eng._pending) == 2  # the batch is full: they wait
    while eng._rows or eng._pending:
        eng.step()
        assert len(eng._rows) <= 2
    assert all(ev[-1]["type"] == "done" for _, ev in jobs) and eng.metrics.requests["rejected"] == 1


def test_a_failing_request_fails_alone_and_the_engine_serves_on(ref, images):
    eng = Engine(ref.model, ref.processor, max_batch=4)
    good, good_ev = make_job(ref, QUESTIONS[0], images[0], 6, ignore_eos=True)
    bad, bad_ev = make_job(ref, QUESTIONS[0], images[1], 6)
    bad.inputs = {**bad.inputs, "images": torch.full_like(bad.inputs["images"], float("nan"))}  # NaN pixels
    eng.submit(good)
    eng.submit(bad)
    while eng._rows or eng._pending:
        eng.step()
    assert bad_ev[-1]["type"] == "error" and bad_ev[-1]["status"] in (400, 500) and "NaN" in bad_ev[-1]["message"]
    assert good_ev[-1]["type"] == "done" and good_ev[-1]["usage"]["completion_tokens"] == 6
    nxt, nxt_ev = make_job(ref, QUESTIONS[2], images[2], 6)
    eng.submit(nxt)
    while eng._rows or eng._pending:
        eng.step()
    assert nxt_ev[-1]["type"] == "done"


def test_cancelled_and_timed_out_rows_leave(ref):
    eng = Engine(ref.model, ref.processor, max_batch=4)
    a, a_ev = make_job(ref, QUESTIONS[0], None, 50, ignore_eos=True)
    b, b_ev = make_job(ref, QUESTIONS[1], None, 50, ignore_eos=True, timeout_s=0.0)
    c, c_ev = make_job(ref, QUESTIONS[2], None, 5, ignore_eos=True)
    for j in (a, b, c):
        eng.submit(j)
    eng.step()  # b has timed out in the queue; a and c are prefilled
    assert b_ev == [{"type": "error", "status": 504, "message": "the request timed out after 0 s"}]
    a.cancel()
    eng.step()
    assert eng._cache.batch_size == 1 and eng.metrics.requests["cancelled"] == 1
    while eng._rows:
        eng.step()
    assert c_ev[-1]["type"] == "done" and a_ev[-1]["type"] == "delta"
