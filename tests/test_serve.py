"""pmod serve through the official `openai` client on a loopback server: plain and streamed answers, images as
data URLs, greedy answers equal to `model.generate` one by one (alone and under concurrent load), the other routes."""
from __future__ import annotations

import json
import threading
import urllib.request

import pytest
from serve_util import DENSE, PMOD, QUESTIONS, Reference, running_server, user_message, write_images

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("serve-images"), 6)


@pytest.fixture(scope="module")
def server():
    with running_server(PMOD, max_batch=16) as srv:
        yield srv


@pytest.fixture(scope="module")
def ref():
    return Reference(PMOD)


def client(srv):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)


def test_plain_answer_with_an_image_equals_generate(server, images, ref):
    c = client(server)
    for img, q in zip(images[:3], QUESTIONS):
        r = c.chat.completions.create(model="tiny-synth-pmod", messages=user_message(q, img), temperature=0, max_tokens=12)
        assert r.choices[0].message.content == ref.answer(q, img, 12)
        assert r.choices[0].finish_reason in ("stop", "length") and r.object == "chat.completion"
        pm = r.usage.pmod
        assert r.usage.prompt_tokens > 256 and pm["vision_tokens"] == 256  # 64 px / 4 px patches: 16 x 16
        assert 0.2 < pm["kept_ratio"] < 0.9 and pm["kv_bytes"] < pm["kv_bytes_dense"]
        assert pm["prefill_tflops"] < pm["prefill_tflops_dense"]


def test_streamed_answer_equals_the_plain_one(server, images, ref):
    c = client(server)
    q, img = QUESTIONS[3], images[4]
    chunks = list(c.chat.completions.create(model="tiny-synth-pmod", messages=user_message(q, img), temperature=0,
                                            max_tokens=20, stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == ref.answer(q, img, 20)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1


def test_text_only_and_stop_and_length(server, ref):
    c = client(server)
    q = "Describe the image."
    full = ref.answer(q, None, 24)
    r = c.chat.completions.create(model="tiny-synth-pmod", messages=user_message(q, None), temperature=0, max_tokens=24)
    assert r.choices[0].message.content == full
    r = c.chat.completions.create(model="tiny-synth-pmod", messages=user_message(q, None), temperature=0, max_tokens=2,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 2
    if len(full) > 2:  # stop on a piece of the answer: the text ends just before it
        stop = full[len(full) // 2 :][:2]
        r = c.chat.completions.create(model="tiny-synth-pmod", messages=user_message(q, None), temperature=0,
                                      max_tokens=24, stop=[stop])
        assert r.choices[0].message.content == full[: full.index(stop)]
        assert r.choices[0].finish_reason == "stop" and stop not in r.choices[0].message.content


def test_seeded_sampling_is_reproducible(server, images):
    c = client(server)
    kw = dict(model="tiny-synth-pmod", messages=user_message(QUESTIONS[3], images[0]), temperature=1.0, top_p=0.9,
              max_tokens=12, seed=1234, extra_body={"ignore_eos": True})
    assert c.chat.completions.create(**kw).choices[0].message.content == c.chat.completions.create(**kw).choices[0].message.content


def test_concurrent_clients_get_their_one_by_one_answers(server, images, ref):
    """8 clients x 2 requests at once (the 32 x 4 version: test_serve_load.py, -m slow): rows of different
    lengths join and leave the running batch, every greedy answer equals its one-by-one answer."""
    jobs = [(QUESTIONS[(i + j) % 4], images[(i * 2 + j) % len(images)] if (i + j) % 3 else None) for i in range(8) for j in range(2)]
    want = {k: ref.answer(q, img, 10) for k, (q, img) in enumerate(jobs)}
    got, errors = {}, []

    def worker(i):
        c = client(server)
        for j in range(2):
            k = i * 2 + j
            q, img = jobs[k]
            try:
                r = c.chat.completions.create(model="tiny-synth-pmod", messages=user_message(q, img), temperature=0,
                                              max_tokens=10)
                got[k] = r.choices[0].message.content
            except Exception as e:  # noqa: BLE001 -- counted
                errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and got == want


def test_models_health_metrics_and_page(server):
    assert [m.id for m in client(server).models.list().data] == ["tiny-synth-pmod"]
    with urllib.request.urlopen(server.url + "/health") as r:
        assert json.load(r) == {"status": "ok"}
    with urllib.request.urlopen(server.url + "/metrics") as r:
        text = r.read().decode()
        assert r.headers["content-type"].startswith("text/plain")
    for name in ("requests_total", "queue_length", "running_rows", "prompt_tokens_total", "generation_tokens_total",
                 "tokens_per_second", "kv_cache_bytes", "kv_cache_dense_bytes", "prefill_flops_saved_total"):
        assert f"# TYPE pmod_{name} " in text, name
    ok = [line for line in text.splitlines() if line.startswith('pmod_requests_total{') and 'outcome="ok"' in line]
    assert ok and float(ok[0].split()[-1]) >= 1
    with urllib.request.urlopen(server.url + "/") as r:
        page = r.read().decode()
        assert page.lower().startswith("<!doctype html") and 'id="answer"' in page


def test_unknown_model_is_404(server):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client(server).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])


def test_the_dense_twin_serves_too(images):
    """The embedded dense model: the same answers as its own `generate`, and usage saying nothing was saved."""
    ref = Reference(DENSE)
    with running_server(DENSE) as srv:
        r = client(srv).chat.completions.create(model="tiny-synth-dense", messages=user_message(QUESTIONS[0], images[0]),
                                                temperature=0, max_tokens=8)
    assert r.choices[0].message.content == ref.answer(QUESTIONS[0], images[0], 8)
    pm = r.usage.pmod
    assert pm["kept_ratio"] == 1.0 and pm["kv_bytes"] == pm["kv_bytes_dense"]
    assert pm["prefill_tflops"] == pm["prefill_tflops_dense"]
