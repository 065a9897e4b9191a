"""Faults and limits of pmod serve over HTTP: each gets its status code, and the next request is answered right."""
from __future__ import annotations

import base64
import json
import threading
import time
import urllib.request

import httpx
import pytest
from serve_util import PMOD, QUESTIONS, Reference, data_url, running_server, user_message, write_images

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("fault-images"), 2)


@pytest.fixture(scope="module")
def server(images):
    with running_server(PMOD, max_batch=4, max_queue=1,
                        settings={"max_body_bytes": 4 * 2**20, "media": _policy(images[0].parent)}) as srv:
        yield srv


def _policy(folder):
    from pmod.serve.media import MediaPolicy

    return MediaPolicy(allowed_folder=folder)


@pytest.fixture(scope="module")
def ref():
    return Reference(PMOD)


def post(srv, body, headers=None, raw: bytes | None = None) -> httpx.Response:
    return httpx.post(srv.url + "/v1/chat/completions", content=raw if raw is not None else json.dumps(body),
                      headers={"content-type": "application/json", **(headers or {})}, timeout=60)


def chat(q, img=None, **kw):
    return {"model": "tiny-synth-pmod", "messages": user_message(q, img), "temperature": 0, "max_tokens": 8, **kw}


def served_right(srv, ref, images):
    """The next request after a fault: answered, and as `model.generate` answers it."""
    r = post(srv, chat(QUESTIONS[0], images[1]))
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == ref.answer(QUESTIONS[0], images[1], 8)


def metric(srv, name, outcome=None) -> float:
    text = urllib.request.urlopen(srv.url + "/metrics").read().decode()
    for line in text.splitlines():
        if line.startswith(f"pmod_{name}{{") and (outcome is None or f'outcome="{outcome}"' in line):
            return float(line.split()[-1])
    raise KeyError(name)


@pytest.mark.parametrize("body, status, words", [
    (b"{not json", 400, "not valid JSON"),
    ({"messages": []}, 400, "'messages' must be a non-empty list"),
    ({"messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "audio", "x": 1}]}]}, 400, "unsupported content part 'audio'"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "'n' must be in [1, 1]"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "'temperature' must be a number"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 600}, 400, "maximum context length is 512"),
    ({"messages": [{"role": "user", "content": "word " * 600}]}, 400, "maximum context length is 512"),
    ({"messages": [{"role": "user", "content": "<image> what is it?"}]}, 400, "placeholder"),
])
def test_bad_requests_are_400_naming_the_problem(server, ref, images, body, status, words):
    r = post(server, None, raw=body) if isinstance(body, bytes) else post(server, body)
    assert r.status_code == status and words in r.json()["error"]["message"], r.text
    served_right(server, ref, images)


def test_bad_images(server, ref, images, tmp_path):
    junk = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"not an image" * 20).decode()
    cases = [(junk, "image 0: not a usable image"),
             ("data:image/png;base64,@@@@", "base64 payload is malformed"),
             ("http://example.invalid/cat.png", "remote image URLs are disabled"),
             ("../../etc/passwd", "outside the allowed media folder"),
             ("nothere.png", "no image file")]
    for url, words in cases:
        body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                          {"type": "text", "text": "What is it?"}]}]}
        r = post(server, body)
        assert r.status_code == 400 and words in r.json()["error"]["message"], (url, r.text)
    served_right(server, ref, images)
    # an allowed local path (a name inside the folder the operator named) works like the data URL
    body = chat(QUESTIONS[0], images[1])
    body["messages"][0]["content"][0]["image_url"]["url"] = images[1].name
    assert post(server, body).json()["choices"][0]["message"]["content"] == ref.answer(QUESTIONS[0], images[1], 8)


def test_a_20_mb_upload_is_413(server, ref, images):
    big = "data:image/png;base64," + "A" * (20 * 2**20)
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": big}}]}]}
    with pytest.raises(openai.APIStatusError) as e:
        openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0).chat.completions.create(
            model="tiny-synth-pmod", messages=body["messages"])
    assert e.value.status_code == 413 and "over 4 MiB" in str(e.value)
    served_right(server, ref, images)


def test_client_disconnecting_mid_stream_cancels_its_row(server, ref, images):
    before = metric(server, "requests_total", "cancelled")
    body = chat(QUESTIONS[3], images[0], max_tokens=230, ignore_eos=True, stream=True)
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]  # the role chunk and a few tokens, then hang up
        assert got[0].startswith("data: ")
    deadline = time.monotonic() + 20
    while metric(server, "requests_total", "cancelled") == before:
        assert time.monotonic() < deadline, "the row was not cancelled"
        time.sleep(0.05)
    assert metric(server, "running_rows") == 0
    served_right(server, ref, images)


def test_queue_overflow_is_429_with_retry_after(server, ref, images):
    """The engine held at a step boundary (a test gate), so that the queue stays full for certain."""
    engine = server.app.state.engine
    gate, step = threading.Event(), engine.step
    engine.step = lambda: (gate.wait(), step())[1]
    try:
        first = {}
        t = threading.Thread(target=lambda: first.setdefault("r", post(server, chat(QUESTIONS[1], images[0]))))
        t.start()
        deadline = time.monotonic() + 20
        while metric(server, "queue_length") < 1:  # the first request waits in the queue (max_queue=1)
            assert time.monotonic() < deadline
            time.sleep(0.02)
        r = post(server, chat(QUESTIONS[0], images[1]))
        assert r.status_code == 429 and r.headers["retry-after"] == "1" and "--max-queue 1" in r.json()["error"]["message"]
    finally:
        gate.set()
        t.join()
        engine.step = step
    assert first["r"].status_code == 200
    assert first["r"].json()["choices"][0]["message"]["content"] == ref.answer(QUESTIONS[1], images[0], 8)
    served_right(server, ref, images)


def test_request_timeout_is_504(server, ref, images):
    settings, engine = server.app.state.settings, server.app.state.engine
    old, gate, step = settings.request_timeout_s, threading.Event(), engine.step
    settings.request_timeout_s = 0.2
    engine.step = lambda: (gate.wait(0.5), step())[1]  # the engine is slower than the request may wait
    try:
        r = post(server, chat(QUESTIONS[0], images[0]))
    finally:
        settings.request_timeout_s, engine.step = old, step
    assert r.status_code == 504 and "timed out after 0.2 s" in r.json()["error"]["message"]
    served_right(server, ref, images)


def test_api_key(images, ref):
    with running_server(PMOD, settings={"api_key": "sesame"}) as srv:
        bad = openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.chat.completions.create(model="tiny-synth-pmod", messages=user_message("hi", None))
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        assert httpx.post(srv.url + "/v1/chat/completions", json=chat("hi")).status_code == 401
        good = openai.OpenAI(base_url=srv.url + "/v1", api_key="sesame", max_retries=0)
        r = good.chat.completions.create(**chat(QUESTIONS[0], images[1]))
        assert r.choices[0].message.content == ref.answer(QUESTIONS[0], images[1], 8)
        assert httpx.get(srv.url + "/health").status_code == 200  # health and metrics stay open, as in vLLM


def test_serve_binds_loopback_by_default():
    from pmod.cli import build_parser

    args = build_parser().parse_args(["serve", "--model", str(PMOD)])
    assert (args.host, args.port, args.max_batch) == ("127.0.0.1", 8000, 32)
    assert data_url  # (imported for the module's other tests)


def test_remote_images_only_when_enabled(images, ref):
    """--allow-remote-images: an http URL is fetched (here from a loopback file server), capped in bytes."""
    import functools
    import http.server

    from pmod.serve.media import MediaPolicy

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(images[0].parent))
    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{files.server_address[1]}/{images[1].name}"
    body = chat(QUESTIONS[0], images[1])
    body["messages"][0]["content"][0]["image_url"]["url"] = url
    try:
        with running_server(PMOD, settings={"media": MediaPolicy(allow_remote=True)}) as srv:
            r = post(srv, body)
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == ref.answer(QUESTIONS[0], images[1], 8)
            missing = {**body, "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url + ".gone"}}, {"type": "text", "text": "?"}]}]}
            r = post(srv, missing)
            assert r.status_code == 400 and "could not fetch" in r.json()["error"]["message"]
        with running_server(PMOD, settings={"media": MediaPolicy(allow_remote=True, max_image_bytes=100)}) as srv:
            r = post(srv, body)
            assert r.status_code == 413 and "image 0: the image is over" in r.json()["error"]["message"]
    finally:
        files.shutdown()
