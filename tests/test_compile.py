"""`model.compile()`: the compiled decoder equals the eager one, traces without graph breaks, and new prompt
lengths reuse its graphs. Inductor compiles take a minute each on a small CPU (cold cache): those tests are slow;
the default suite checks tracing and compile counts with dynamo's `eager` backend (same graphs, no codegen)."""
from __future__ import annotations

import pytest
import torch
from conftest import make_batch, official_anyres_checkpoint, tiny_model
from torch._dynamo.utils import counters

import pmod

ATOL = 1e-5  # float32: the compiled graph reorders sums and pads batched attention; eager's own noise is ~1e-6


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _compiles() -> int:
    """Graphs dynamo handed to the backend (one per compilation of prefill or decode)."""
    return counters["stats"]["unique_graphs"]


def _inputs(case: str):
    if case == "dense":
        ids, mask, n = make_batch([(3, 0, 6)])
        return {"input_ids": ids}
    rows = [(3, 1, 5), (7, 0, 2), (1, 1, 4)] if case == "left_padded" else [(2, 1, 6)]
    ids, mask, n = make_batch(rows, side="left")
    pix = torch.randn(n, 3, 42, 42, generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "images": pix, "attention_mask": mask if case == "left_padded" else None}


def _anyres_model(official_dir, tmp_path):
    from safetensors.torch import load_file

    ck = official_anyres_checkpoint(official_dir, tmp_path)
    ref = load_file(official_dir / "anyres.safetensors")
    inputs = {"input_ids": ref["input_ids"], "images": ref["images"], "image_sizes": ref["image_sizes_wh"].tolist()}
    return pmod.from_pretrained(ck).eval(), inputs


def _eager_then_compiled(model, inputs, new_tokens=5, **compile_kwargs):
    with torch.no_grad():
        ref = model(**inputs, use_cache=True)
    tokens = model.generate(**inputs, max_new_tokens=new_tokens, eos_token_id=[])
    model.compile(**compile_kwargs)
    with torch.no_grad():
        got = model(**inputs, use_cache=True)
    got_tokens = model.generate(**inputs, max_new_tokens=new_tokens, eos_token_id=[])
    model.compile(disable=True)
    return ref, tokens, got, got_tokens


def _check_equal(ref, tokens, got, got_tokens):
    assert (got.logits - ref.logits).abs().max().item() <= ATOL
    assert got.past_key_values.lengths == ref.past_key_values.lengths
    for a, b in zip(ref.routing, got.routing):
        assert torch.equal(a.kept, b.kept) and (a.weights - b.weights).abs().max() <= ATOL
    assert torch.equal(got_tokens, tokens)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["dense", "pmod", "left_padded"])
def test_compiled_equals_eager_inductor(case):
    model = tiny_model(layers=4)
    inputs = _inputs(case)
    _check_equal(*_eager_then_compiled(model, inputs))
    assert _compiles() >= 2  # prefill and decode really went through inductor


@pytest.mark.slow
def test_compiled_equals_eager_anyres_inductor(official_dir, tmp_path):
    model, inputs = _anyres_model(official_dir, tmp_path)
    _check_equal(*_eager_then_compiled(model, inputs))
    assert _compiles() >= 2


@pytest.mark.parametrize("case", ["pmod", "left_padded"])
def test_decoder_traces_in_one_graph(case):
    """fullgraph=True raises on any graph break; the eager backend runs dynamo's graphs as they are traced."""
    model = tiny_model(layers=3)
    _check_equal(*_eager_then_compiled(model, _inputs(case), new_tokens=3, backend="eager"))
    assert _compiles() >= 2 and counters["graph_break"] == {}


def test_fullgraph_raises_on_a_graph_break(monkeypatch):
    """The check above can fail: a graph break inside the traced stack is an error under fullgraph=True."""
    from pmod.modeling import attention_compiled

    real = attention_compiled.TracedAttention.prefill

    def syncing(self, q, k, v, rows, scale):
        torch._dynamo.graph_break()  # what an untraceable call (a host sync, a Python-side effect) would cause
        return real(self, q, k, v, rows, scale)

    monkeypatch.setattr(attention_compiled.TracedAttention, "prefill", syncing)
    model = tiny_model(layers=2).compile(backend="eager")
    with pytest.raises(Exception, match="(?i)graph.break"), torch.no_grad():
        model(**_inputs("pmod"))


def _entries(fn) -> int:
    """Compilations of one function that dynamo keeps (one cache entry per graph it compiled for it)."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    return len(_debug_get_cache_entry_list(fn))


def _three_lengths(model):
    with torch.no_grad():
        for before in (2, 5, 9):  # three prompt lengths, an image in each
            ids, _, n = make_batch([(before, 1, 3)], seed=before)
            out = model(input_ids=ids, images=torch.randn(n, 3, 42, 42), use_cache=True, logits_to_keep="last")
            for _ in range(2):
                model.decode_step(out.logits.argmax(-1), out.past_key_values)


def test_three_prompt_lengths_compile_at_most_twice_eager_backend():
    from pmod.modeling.compiled import decode_stack, prefill_stack

    _three_lengths(tiny_model(layers=3).compile(backend="eager"))
    assert 1 <= _entries(prefill_stack) <= 2 and 1 <= _entries(decode_stack) <= 2


@pytest.mark.slow
def test_three_prompt_lengths_compile_at_most_twice_inductor():
    from pmod.modeling.compiled import decode_stack, prefill_stack

    _three_lengths(tiny_model(layers=3).compile())
    assert 1 <= _entries(prefill_stack) <= 2 and 1 <= _entries(decode_stack) <= 2


def test_compiled_falls_back_to_eager_where_it_does_not_trace():
    """Labels (training loss) and continuation chunks run the eager stack; the results stay those of eager."""
    model = tiny_model(layers=2)
    inputs = _inputs("pmod")
    with torch.no_grad():
        ref = model(**inputs, labels=inputs["input_ids"])
        model.compile(backend="eager")
        got = model(**inputs, labels=inputs["input_ids"])
    assert torch.equal(got.loss, ref.loss) and _compiles() == 0


def test_string_off_and_reduction_under_compile():
    """The compiled stack honours ModConfig(string=False); a training-free reduction (a layout change mid-stack)
    stays eager and gives the eager result."""
    import dataclasses

    from pmod import ReductionSpec

    model = tiny_model(layers=3)
    lm = model.language_model
    lm.route_specs = {i: dataclasses.replace(s, string=False) for i, s in lm.route_specs.items()}
    _check_equal(*_eager_then_compiled(model, _inputs("pmod"), new_tokens=3, backend="eager"))
    model = tiny_model(layers=3)
    model.reduction = ReductionSpec("fastv", (1,), 0.5)
    _check_equal(*_eager_then_compiled(model, _inputs("pmod"), new_tokens=3, backend="eager"))
