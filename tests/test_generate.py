"""Generation: batched = one by one, sampling filters, streaming, stopping, context limits."""
from __future__ import annotations

import pytest
import torch
from conftest import make_batch, tiny_model

from pmod.sampling import filter_logits, sample_next

ROWS = [(3, 1, 5), (7, 0, 2), (1, 2, 4)]


def test_batched_generation_equals_one_by_one():
    model = tiny_model(layers=6)
    ids, mask, n = make_batch(ROWS, side="left")
    pix = torch.randn(n, 3, 42, 42, generator=torch.Generator().manual_seed(3))
    batch = model.generate(input_ids=ids, images=pix, attention_mask=mask, max_new_tokens=7, eos_token_id=[])
    used = 0
    for b, (_, n_img, _) in enumerate(ROWS):
        real = mask[b].bool()
        one = model.generate(input_ids=ids[b : b + 1, real], images=pix[used : used + n_img] if n_img else None,
                             max_new_tokens=7, eos_token_id=[])
        used += n_img
        assert torch.equal(batch[b], one[0]), b


def test_eos_stops_a_row_and_pads_it():
    model = tiny_model(layers=4)
    ids, mask, n = make_batch(ROWS[:2], side="left")
    pix = torch.randn(n, 3, 42, 42)
    free = model.generate(input_ids=ids, images=pix, attention_mask=mask, max_new_tokens=6, eos_token_id=[])
    eos = int(free[0, 2])  # pretend row 0's third token is EOS
    out = model.generate(input_ids=ids, images=pix, attention_mask=mask, max_new_tokens=6, eos_token_id=eos, pad_token_id=-1)
    stop = (free[0] == eos).nonzero()[0, 0].item()
    assert torch.equal(out[0, : stop + 1], free[0, : stop + 1]) and (out[0, stop + 1 :] == -1).all()
    row1_stop = (free[1] == eos).nonzero()
    if len(row1_stop) == 0:
        assert torch.equal(out[1], free[1][: out.shape[1]])


def test_streamer_sees_every_step():
    model = tiny_model(layers=3)
    ids, _, n = make_batch([(3, 1, 2)])
    seen = []
    out = model.generate(input_ids=ids, images=torch.randn(n, 3, 42, 42), max_new_tokens=5, eos_token_id=[], streamer=seen.append)
    assert torch.equal(torch.stack(seen, 1), out)


def test_transformers_streamer_protocol():
    """put(prompt) first (the text of the prompt: no image placeholder, no padding), then put(tokens [B]) per step,
    end() once; at batch > 1 the prompt keeps its [B, T] shape with placeholders as padding."""
    from transformers.generation.streamers import BaseStreamer

    class Recorder(BaseStreamer):
        def __init__(self):
            self.puts, self.ends = [], 0

        def put(self, value):
            self.puts.append(value)

        def end(self):
            self.ends += 1

    model = tiny_model(layers=3)
    ids, mask, n = make_batch([(3, 1, 2)], side="left")
    rec = Recorder()
    out = model.generate(input_ids=ids, images=torch.randn(n, 3, 42, 42), attention_mask=mask, max_new_tokens=4,
                         eos_token_id=[], streamer=rec)
    assert torch.equal(rec.puts[0], ids[:, ids[0] >= 0]) and rec.ends == 1
    assert torch.equal(torch.stack(rec.puts[1:], 1), out)
    ids, mask, n = make_batch(ROWS, side="left")
    rec = Recorder()
    out = model.generate(input_ids=ids, images=torch.randn(n, 3, 42, 42), attention_mask=mask, max_new_tokens=3,
                         eos_token_id=[], pad_token_id=0, streamer=rec)
    assert rec.puts[0].shape == ids.shape and (rec.puts[0] >= 0).all() and len(rec.puts) == 4


def test_text_streamer_prints_the_answer(capsys):
    """`generate(streamer=transformers.TextStreamer(tokenizer))`, as LLaVA's CLI uses it: the printed text is the
    decoded answer (skip_prompt=True), or the prompt's text and then the answer (skip_prompt=False)."""
    from conftest import tiny_tokenizer
    from transformers import TextStreamer

    tok = tiny_tokenizer([f"w{i}" for i in range(93)])  # every one of the model's 97 ids decodes
    model = tiny_model(layers=3)
    ids, _, n = make_batch([(3, 1, 2)])
    pix = torch.randn(n, 3, 42, 42)
    out = model.generate(input_ids=ids, images=pix, max_new_tokens=6, eos_token_id=[],
                         streamer=TextStreamer(tok, skip_prompt=True))
    assert capsys.readouterr().out == tok.decode(out[0]) + "\n"
    model.generate(input_ids=ids, images=pix, max_new_tokens=6, eos_token_id=[], streamer=TextStreamer(tok))
    printed = capsys.readouterr().out
    assert printed.startswith(tok.decode(ids[0, ids[0] >= 0])) and printed.rstrip().endswith(tok.decode(out[0]))


def test_sampling_is_reproducible_with_a_generator():
    model = tiny_model(layers=3)
    ids, _, n = make_batch([(3, 1, 2)])
    pix = torch.randn(n, 3, 42, 42)
    kw = dict(input_ids=ids, images=pix, max_new_tokens=6, eos_token_id=[], do_sample=True, temperature=1.5, top_p=0.9)
    a = model.generate(**kw, generator=torch.Generator().manual_seed(7))
    b = model.generate(**kw, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_filter_logits_against_a_plain_reference():
    torch.manual_seed(0)
    logits = torch.randn(4, 50, dtype=torch.float64)
    for top_k, top_p in [(0, 1.0), (5, 1.0), (0, 0.7), (10, 0.5)]:
        got = filter_logits(logits, temperature=0.8, top_k=top_k, top_p=top_p)
        for b in range(4):
            row = logits[b] / 0.8
            order = row.argsort(descending=True)
            keep = set(order[:top_k].tolist()) if top_k else set(range(50))
            # top-p acts on the distribution left by top-k (the order transformers applies them)
            probs = row.masked_fill(torch.tensor([i not in keep for i in range(50)]), float("-inf")).softmax(-1)
            acc, nucleus = 0.0, set()
            for i in order.tolist():  # smallest prefix whose mass reaches top_p
                nucleus.add(i)
                acc += probs[i].item()
                if acc >= top_p:
                    break
            expect = keep & nucleus if top_p < 1 else keep
            assert set(torch.isfinite(got[b]).nonzero().flatten().tolist()) == expect


def test_sample_next_follows_the_distribution():
    probs = torch.tensor([[0.1, 0.6, 0.3]])
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_next(probs.log(), do_sample=True, generator=g) for _ in range(4000)]).flatten()
    freq = torch.bincount(draws, minlength=3).double() / 4000
    assert torch.allclose(freq, probs[0].double(), atol=0.03)
    assert sample_next(probs.log()).item() == 1  # greedy


def test_bad_generation_arguments():
    model = tiny_model(layers=2)
    ids, _, n = make_batch([(3, 1, 2)])
    pix = torch.randn(n, 3, 42, 42)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(input_ids=ids, images=pix, do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(input_ids=ids, images=pix, max_new_tokens=0)
    with pytest.raises(ValueError, match="exceeds the model's context of 512"):
        model.generate(input_ids=ids, images=pix, max_new_tokens=600)
    with pytest.raises(ValueError, match="stop_strings need a tokenizer"):
        model.generate(input_ids=ids, images=pix, stop_strings=["\n"])


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_static_cache_decodes_like_the_dynamic_one(backend):
    """The cache mode a CUDA graph replays (fixed capacity, device-side slots, length mask, in-place lengths)
    gives the dynamic mode's logits step by step, on rows of unequal length through MoD layers."""
    model = tiny_model(layers=6)
    model.attn_backend = backend
    ids, mask, n = make_batch(ROWS, side="left")
    pix = torch.randn(n, 3, 42, 42, generator=torch.Generator().manual_seed(3))
    caches, logits = [], []
    with torch.inference_mode():
        for _ in range(2):
            out = model(input_ids=ids, images=pix, attention_mask=mask, use_cache=True, logits_to_keep="last")
            caches.append(out.past_key_values)
            logits.append(out.logits)
        dynamic, static = caches
        static.make_static(5)
        assert static.steps_left() >= 5
        tok = logits[0].argmax(-1)
        for _ in range(5):
            a, b = model.decode_step(tok, dynamic), model.decode_step(tok, static)
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
            tok = a.argmax(-1)
    assert static.lengths == dynamic.lengths
    assert all(torch.equal(s, d) for s, d in zip(static.seqlens, dynamic.seqlens))
    assert torch.equal(static.positions, dynamic.positions)
    with pytest.raises(RuntimeError, match="static"):
        static.select_rows(torch.tensor([0]))


def test_cuda_graph_needs_cuda():
    model = tiny_model(layers=2)
    ids, _, n = make_batch(ROWS[:1])
    with pytest.raises(ValueError, match="CUDA"):
        model.generate(input_ids=ids, images=torch.randn(n, 3, 42, 42), max_new_tokens=3, cuda_graph=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_generation_matches_eager():
    model = tiny_model(layers=6).cuda()
    ids, mask, n = make_batch(ROWS, side="left")
    pix = torch.randn(n, 3, 42, 42, generator=torch.Generator().manual_seed(3)).cuda()
    kw = dict(input_ids=ids.cuda(), images=pix, attention_mask=mask.cuda(), max_new_tokens=9, eos_token_id=[])
    eager, (graphed, cache) = model.generate(**kw), model.generate(**kw, cuda_graph=True, return_cache=True)
    assert torch.equal(eager, graphed)
    assert not cache.static  # handed back dynamic: it can grow again
