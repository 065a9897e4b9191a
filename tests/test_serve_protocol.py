"""The pure parts of pmod serve: request parsing and its errors, the streamed text (stop strings, held-back
characters), packing rows into one prefill batch, the Prometheus text."""
from __future__ import annotations

import pytest
import torch

from pmod.packing import IMAGE_TOKEN_INDEX
from pmod.serve.inputs import stack_inputs
from pmod.serve.metrics import Metrics
from pmod.serve.protocol import RequestError, parse_chat_request
from pmod.serve.text import AnswerText


def test_parse_a_vision_request():
    req = parse_chat_request({
        "model": "m", "messages": [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Look: "}, {"type": "image_url", "image_url": {"url": "data:x"}},
                                         {"type": "text", "text": "what is it?"}]}],
        "max_completion_tokens": 7, "temperature": 0, "stop": "END", "seed": 3, "stream": True,
        "stream_options": {"include_usage": True}, "pmod": {"routing": True}})
    assert req.messages == [{"role": "system", "content": "Be brief."},
                            {"role": "user", "content": "Look: <image>\nwhat is it?"}]
    assert req.images == ["data:x"] and req.max_tokens == 7 and req.greedy and req.stop == ["END"]
    assert req.stream and req.include_usage and req.routing and req.seed == 3


@pytest.mark.parametrize("body, words", [
    ([], "must be a JSON object"),
    ({"messages": "hi"}, "'messages' must be a non-empty list"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "needs a 'url' string"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "end with a user message"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}, "only as the first"),
    ({"messages": [{"role": "user", "content": "a"}], "max_tokens": 0}, "'max_tokens' must be in [1"),
    ({"messages": [{"role": "user", "content": "a"}], "max_tokens": 2.5}, "'max_tokens' must be an integer"),
    ({"messages": [{"role": "user", "content": "a"}], "top_p": 0}, "'top_p' must be in (0, 1]"),
    ({"messages": [{"role": "user", "content": "a"}], "temperature": 3}, "'temperature' must be in [0.0, 2.0]"),
    ({"messages": [{"role": "user", "content": "a"}], "stop": ["a", "b", "c", "d", "e"]}, "up to 4"),
    ({"messages": [{"role": "user", "content": "a"}], "stream": "yes"}, "'stream' must be true or false"),
])
def test_parse_errors_name_the_field(body, words):
    with pytest.raises(RequestError) as e:
        parse_chat_request(body)
    assert e.value.status == 400 and words in e.value.message


def test_answer_text_holds_back_what_a_stop_string_may_claim():
    vocab = {1: "The", 2: " cat", 3: " E", 4: "ND", 5: " sat"}
    decode = lambda ids: "".join(vocab[i] for i in ids)
    t = AnswerText(decode, ["END"])
    sent = [t.add(1), t.add(2), t.add(3)]
    assert "".join(sent) == "The cat"  # ' E' held back: 'END' may be starting there
    assert t.add(4) == " " and t.stopped and t.text == "The cat "
    t = AnswerText(decode, ["END"])
    assert "".join([t.add(1), t.add(2), t.add(5)]) + t.finish() == "The cat sat" and not t.stopped
    t = AnswerText(lambda ids: "ab\ufffd"[: len(ids) + 1], [])  # a character split across tokens waits
    assert t.add(7) == "ab" and t.add(8) == "" and t.finish() == "\ufffd"


def test_stack_inputs_left_pads_and_keeps_image_order():
    rows = [{"input_ids": torch.tensor([[1, IMAGE_TOKEN_INDEX, 5]]), "attention_mask": torch.ones(1, 3, dtype=torch.long),
             "images": torch.zeros(1, 3, 4, 4), "image_sizes": [(4, 4)]},
            {"input_ids": torch.tensor([[1, 6]]), "attention_mask": torch.ones(1, 2, dtype=torch.long),
             "images": None, "image_sizes": None},
            {"input_ids": torch.tensor([[1, IMAGE_TOKEN_INDEX]]), "attention_mask": torch.ones(1, 2, dtype=torch.long),
             "images": torch.ones(1, 3, 4, 4), "image_sizes": [(8, 8)]}]
    b = stack_inputs(rows, pad_id=0)
    assert b["input_ids"].tolist() == [[1, IMAGE_TOKEN_INDEX, 5], [0, 1, 6], [0, 1, IMAGE_TOKEN_INDEX]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [0, 1, 1], [0, 1, 1]]
    assert b["images"][:, 0, 0, 0].tolist() == [0.0, 1.0] and b["image_sizes"] == [(4, 4), (8, 8)]


def test_metrics_render_prometheus_text():
    m = Metrics()
    m.outcome("ok")
    m.add(prompt_tokens=10, generation_tokens=3, prefill_flops=4e9, prefill_flops_dense=1e10)
    m.set(queue_length=2, running_rows=1, kv_cache_bytes=100, kv_cache_dense_bytes=300)
    text = m.render("tiny")
    assert 'pmod_requests_total{model_name="tiny",outcome="ok"} 1' in text
    assert 'pmod_prefill_flops_saved_total{model_name="tiny"} 6000000000' in text
    assert 'pmod_queue_length{model_name="tiny"} 2' in text and 'pmod_kv_cache_dense_bytes{model_name="tiny"} 300' in text
    assert 0 < m.tokens_per_second() <= 3
    for line in text.splitlines():  # every sample line is `name{labels} value`
        assert line.startswith("# ") or (line.count("{") == 1 and float(line.rsplit(" ", 1)[1]) >= 0)
