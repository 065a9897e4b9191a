"""The bounded load test: 32 concurrent clients x 4 requests each on loopback (the shipped tiny p-MoD model),
0 errors, every greedy answer equal to its one-by-one `model.generate` answer. Timings are eval/serve_load.py's
(BENCHMARKS.md), not asserted here; tests/test_serve.py runs an 8 x 2 version by default."""
from __future__ import annotations

import threading

import pytest
from serve_util import PMOD, QUESTIONS, Reference, running_server, user_message, write_images

openai = pytest.importorskip("openai")


@pytest.mark.slow
@pytest.mark.parametrize("ignore_eos", [False, True], ids=["greedy", "fixed-length"])
def test_32_clients_x_4_requests(tmp_path, ignore_eos):
    images = write_images(tmp_path, 8)
    jobs = [(QUESTIONS[k % 4], None if k % 4 == 3 else images[k % 8]) for k in range(128)]
    ref = Reference(PMOD)
    n = 16
    want = []
    for q, img in jobs:
        if ignore_eos:
            from pmod.multimodal.images import load_image

            inputs = ref.processor([{"role": "user", "content": ("<image>\n" if img else "") + q}],
                                   images=[load_image(img)] if img else None)
            want.append(ref.processor.decode(ref.model.generate(**inputs, max_new_tokens=n, eos_token_id=[])[0]))
        else:
            want.append(ref.answer(q, img, n))
    got, errors = [None] * len(jobs), []
    with running_server(PMOD, max_batch=32) as srv:
        def client(c):
            cl = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=300)
            for k in range(c, len(jobs), 32):
                q, img = jobs[k]
                try:
                    got[k] = cl.chat.completions.create(model="tiny-synth-pmod", messages=user_message(q, img),
                                                        temperature=0, max_tokens=n,
                                                        extra_body={"ignore_eos": ignore_eos}).choices[0].message.content
                except Exception as e:  # noqa: BLE001 -- counted
                    errors.append(f"{k}: {e!r}")

        threads = [threading.Thread(target=client, args=(c,)) for c in range(32)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        c = srv.app.state.engine.metrics.counters
    assert errors == []
    assert [k for k in range(len(jobs)) if got[k] != want[k]] == []
    assert c["decode_steps"] < c["generation_tokens"] - len(jobs)  # rows shared decode steps
