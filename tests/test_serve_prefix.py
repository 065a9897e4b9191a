"""The server's prefix cache: a request whose image prefix is stored skips that part of its prefill and gives the
answer a miss gives (= `model.generate` alone); requests about one image admitted together prefill it once; hits,
misses and bytes are counted in /metrics; the byte bound evicts, least recently used first."""
from __future__ import annotations

import urllib.request

import pytest
from serve_util import PMOD, QUESTIONS, Reference, running_server, user_message, write_images
from test_serve_engine import answer, make_job

from pmod.serve.engine import Engine


@pytest.fixture(scope="module")
def ref():
    return Reference(PMOD)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("prefix-images"), 3)


def run(eng, jobs):
    for job, _ in jobs:
        eng.submit(job)
    while eng._rows or eng._pending:
        eng.step()


def test_hits_answer_as_misses_and_one_admission_prefills_an_image_once(ref, images):
    eng = Engine(ref.model, ref.processor, max_batch=8, prefix_cache_bytes=64 * 2**20)
    first = [(QUESTIONS[0], images[0]), (QUESTIONS[1], images[0]), (QUESTIONS[2], images[1]), (QUESTIONS[3], None)]
    jobs = [make_job(ref, q, img, 8, ignore_eos=True) for q, img in first]
    run(eng, jobs)
    st = eng.prefixes.stats()
    # image 0 twice and image 1 in one admission: 2 misses prefilled (with the text-only request) in one packed
    # forward, the second question about image 0 continuing the prefix cut out of it: a hit, a second forward
    assert (st.hits, st.misses, st.entries, eng.metrics.counters["prefill_batches"]) == (1, 2, 2, 2)
    second = [(QUESTIONS[3], images[0]), (QUESTIONS[0], images[1])]
    jobs2 = [make_job(ref, q, img, 8, ignore_eos=True) for q, img in second]
    run(eng, jobs2)
    st = eng.prefixes.stats()
    assert (st.hits, st.misses, eng.metrics.counters["prefill_batches"]) == (3, 2, 3)  # both hit: one chunk forward
    for (q, img), (_, ev) in zip(first + second, jobs + jobs2):
        assert answer(ev) == _generate(ref, q, img, 8), (q, img)
    cached = [ev[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] for _, ev in jobs + jobs2]
    n_prompt = [ev[-1]["usage"]["prompt_tokens"] for _, ev in jobs + jobs2]
    assert cached[0] == cached[2] == cached[3] == 0 and all(256 < c < n for c, n in zip(cached, n_prompt) if c)
    assert [c > 0 for c in cached] == [False, True, False, False, True, True]
    miss, hit = jobs[0][1][-1]["usage"]["pmod"], jobs2[0][1][-1]["usage"]["pmod"]  # image 0: same routing, same counts
    assert hit["kept_per_layer"] == miss["kept_per_layer"] and hit["kept_ratio"] == miss["kept_ratio"] < 1
    assert eng.metrics.counters["prompt_tokens_cached"] == sum(cached)


def _generate(ref, question, image, n):
    from pmod.multimodal.images import load_image

    inputs = ref.processor([{"role": "user", "content": ("<image>\n" if image else "") + question}],
                           images=[load_image(image)] if image else None)
    return ref.processor.decode(ref.model.generate(**inputs, max_new_tokens=n, eos_token_id=[])[0])


def test_the_byte_bound_evicts_the_least_recently_used(ref, images):
    probe = Engine(ref.model, ref.processor, prefix_cache_bytes=2**30)
    run(probe, [make_job(ref, QUESTIONS[0], images[0], 1)])
    size = probe.prefixes.stats().bytes  # one image prefix (the three images' prefixes have one length)
    eng = Engine(ref.model, ref.processor, max_batch=4, prefix_cache_bytes=int(1.5 * size))
    for img in (images[0], images[1], images[0]):  # image 1 evicts image 0, which then misses again
        run(eng, [make_job(ref, QUESTIONS[1], img, 3, ignore_eos=True)])
    st = eng.prefixes.stats()
    assert (st.hits, st.misses, st.evictions, st.entries) == (0, 3, 2, 1) and st.bytes == size <= st.max_bytes
    jobs = [make_job(ref, QUESTIONS[2], images[0], 3, ignore_eos=True)]
    run(eng, jobs)  # the most recent (image 0) is the one kept
    assert eng.prefixes.stats().hits == 1 and answer(jobs[0][1]) == _generate(ref, QUESTIONS[2], images[0], 3)
    tiny = Engine(ref.model, ref.processor, prefix_cache_bytes=size - 1)  # no prefix fits: served, nothing stored
    jobs = [make_job(ref, QUESTIONS[0], images[2], 3, ignore_eos=True), make_job(ref, QUESTIONS[1], images[2], 3, ignore_eos=True)]
    run(tiny, jobs)
    assert tiny.prefixes.stats().entries == 0 and tiny.prefixes.stats().hits == 1  # the second continued the first's
    assert [answer(ev) for _, ev in jobs] == [_generate(ref, q, images[2], 3) for q in QUESTIONS[:2]]


def test_openai_client_hit_equals_miss_and_metrics_count_it(images, ref):
    openai = pytest.importorskip("openai")
    with running_server(PMOD, prefix_cache_mb=32) as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        ask = lambda q: c.chat.completions.create(model="tiny-synth-pmod", messages=user_message(q, images[1]),  # noqa: E731
                                                  temperature=0, max_tokens=12)
        miss, hit, again = ask(QUESTIONS[0]), ask(QUESTIONS[0]), ask(QUESTIONS[2])
        with urllib.request.urlopen(srv.url + "/metrics") as r:
            text = r.read().decode()
    assert miss.choices[0].message.content == hit.choices[0].message.content == ref.answer(QUESTIONS[0], images[1], 12)
    assert again.choices[0].message.content == ref.answer(QUESTIONS[2], images[1], 12)
    assert miss.usage.prompt_tokens_details.cached_tokens == 0 < hit.usage.prompt_tokens_details.cached_tokens
    assert hit.usage.prompt_tokens == miss.usage.prompt_tokens and hit.usage.pmod == miss.usage.pmod
    values = {line.split("{")[0]: float(line.split()[-1]) for line in text.splitlines() if line.startswith("pmod_prefix")}
    assert values["pmod_prefix_cache_hits_total"] == 2 and values["pmod_prefix_cache_misses_total"] == 1
    assert values["pmod_prefix_cache_entries"] == 1 and 0 < values["pmod_prefix_cache_bytes"] <= 32 * 2**20
    assert values["pmod_prefix_cache_max_bytes"] == 32 * 2**20
