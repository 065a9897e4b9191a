"""pmod_kernels: the PyTorch references (gradcheck, the MoD layer's calls against float64 math) and the Triton kernels
against them.

The Triton tests (`test_triton_*`) run on CUDA when there is one; on a CPU-only machine
`test_kernels_in_interpreter` re-runs them in a subprocess with TRITON_INTERPRET=1, which triton reads when a
kernel is decorated, so the setting never leaks into this process or other test modules.
Tolerances: fp32 against the fp32 reference at fp32 rounding; fp16/bf16 within twice the reference's own error
against an fp64 oracle (flash-attention's rule), plus one ulp because the interpreter casts fp32 to bf16 by
truncation where CUDA rounds to nearest even (on CUDA the merge forward must match the reference bit for bit).
Legend: N packed tokens, C hidden size, Nv routed rows, Nk kept rows.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pmod_kernels as pk
from pmod_kernels import reference as ref

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None
ON_CUDA = torch.cuda.is_available() and not INTERPRETED
DEVICE = "cuda" if ON_CUDA else "cpu"
triton_only = pytest.mark.skipif(
    not HAS_TRITON or not (INTERPRETED or ON_CUDA),
    reason="no CUDA: run by test_kernels_in_interpreter under TRITON_INTERPRET=1" if HAS_TRITON else "no triton",
)


# ---------------------------------------------------------------------------------------------- inputs


def _kept(N: int, kept: str, g: torch.Generator) -> torch.Tensor:
    """Unique ascending row indices: none, all, or a random ~40% of range(N)."""
    if kept == "none":
        return torch.zeros(0, dtype=torch.long)
    if kept == "all":
        return torch.arange(N)
    return torch.randperm(N, generator=g)[: max(1, 2 * N // 5)].sort().values


def merge_inputs(N: int, C: int, kept: str, dtype=torch.float64, seed: int = 0):
    """(x [N, C], w_tok [N], idx [Nk], h_mid [Nk, C], m [Nk, C]) with w = 1 on ~1/4 of the tokens (text)."""
    g = torch.Generator().manual_seed(seed)
    idx = _kept(N, kept, g)
    w = 0.2 * torch.tanh(torch.randn(N, generator=g, dtype=torch.float64)) + 1
    w = torch.where(torch.rand(N, generator=g) < 0.25, 1.0, w)
    x, h, m = (torch.randn(n, C, generator=g, dtype=torch.float64) for n in (N, len(idx), len(idx)))
    return tuple(t.to(DEVICE, dtype) for t in (x, w)) + (idx.to(DEVICE),) + tuple(t.to(DEVICE, dtype) for t in (h, m))


def router_inputs(N: int, C: int, kept: str, bias: bool = True, dtype=torch.float64, seed: int = 0):
    """(x [N, C], weight [1, C], bias [1] or None, rows [Nv]), logits of order 1 so tanh/sigmoid are not saturated."""
    g = torch.Generator().manual_seed(seed)
    rows = _kept(N, kept, g)
    rows = rows[torch.randperm(len(rows), generator=g)]  # any order, as long as unique
    x = torch.randn(N, C, generator=g, dtype=torch.float64)
    weight = torch.randn(1, C, generator=g, dtype=torch.float64) / C**0.5
    b = torch.randn(1, generator=g, dtype=torch.float64) if bias else None
    x, weight = x.to(DEVICE, dtype), weight.to(DEVICE, dtype)
    return x, weight, None if b is None else b.to(DEVICE, dtype), rows.to(DEVICE)


def run(fn, inputs, grad_seed: int = 1):
    """fn(*inputs) and the grads of <out, G> w.r.t. every float input (None for those without a gradient)."""
    leaves = [t.detach().clone().requires_grad_() if t is not None and t.is_floating_point() else t for t in inputs]
    out = fn(*leaves)
    G = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64)
    diff = [t for t in leaves if t is not None and t.requires_grad]
    grads = iter(torch.autograd.grad(out, diff, G.to(out), allow_unused=True))
    return out.detach(), [next(grads) if t is not None and t.requires_grad else None for t in leaves]


def assert_within_2x(got: torch.Tensor, ref_lowp: torch.Tensor, oracle: torch.Tensor, what: str):
    """|got - oracle| <= 2 |ref_lowp - oracle| + 1 ulp (max norms), the fast path no worse than PyTorch's own."""
    err = (got.double() - oracle).abs().max().item() if got.numel() else 0.0
    ref_err = (ref_lowp.double() - oracle).abs().max().item() if got.numel() else 0.0
    ulp = torch.finfo(got.dtype).eps * (oracle.abs().max().item() if got.numel() else 0.0)
    assert err <= 2 * ref_err + ulp, f"{what}: error {err:.3g} > 2 x reference error {ref_err:.3g} + ulp {ulp:.3g}"


# ---------------------------------------------------------------------------------------------- references


def _spec_norm(r: torch.Tensor, norm: str, valid_rows: list[list[int]]) -> torch.Tensor:
    """w = 0.2 f(r) + 1 (PMOD_SPEC §3), written out here, not taken from pmod.routing. r [Nv] float64."""
    if norm == "softmax":  # over each row's own vision tokens
        f = torch.cat([torch.softmax(r[ix], 0) for ix in valid_rows])
    else:
        f = {"tanh": torch.tanh, "sigmoid": torch.sigmoid, "none": lambda t: t}[norm](r)
    return 0.2 * f + 1.0


@pytest.mark.parametrize("norm", [*pk.ELEMENTWISE_NORMS, "softmax"])
def test_the_mod_layers_calls_against_float64_math(norm):
    """What mod.py calls (`pmod_kernels.route`, `pmod_kernels.string_merge_op`, backend 'auto' on a CPU = the
    reference) on a real two-row Layout with unequal image counts, against the MoD equations in float64: router
    w = 0.2 f(x W + b) + 1 on vision tokens, 1 on text; each row keeps its kept_count(n_v, ratio) vision tokens of
    largest w with all its text; out = h_mid + w m on processed tokens and w x on skipped ones. Indices exactly;
    values at fp32 rounding of the float64 result."""
    from pmod.packing import IMAGE_TOKEN_INDEX, build_layout
    from pmod.schedule import kept_count

    g = torch.Generator().manual_seed(5)
    P, C, ratio = 7, 16, 0.5
    ids = torch.tensor([[1, 5, IMAGE_TOKEN_INDEX, 6, 7, IMAGE_TOKEN_INDEX, 8], [1, 9, IMAGE_TOKEN_INDEX, 4, 3, 2, 0]])
    mask = torch.tensor([[1] * 7, [1] * 6 + [0]])
    layout = build_layout(ids, mask, [P, P, P], "cpu")
    N = layout.num_tokens
    x = torch.randn(N, C, generator=g)  # [N, C]
    weight, bias = torch.randn(1, C, generator=g) / C**0.5, torch.randn(1, generator=g)
    plan = layout.route(ratio)
    assert pk.pick_backend(x) == ("triton" if x.is_cuda and HAS_TRITON else "torch")
    idx, w_tok, kept = pk.route(x, weight, bias, layout.vision_dest, layout.vision_slots, layout.vision_flat,
                                layout.text_keep(), plan.k_dev, plan.k_max, plan.varlen.total, norm, 0.2, 1.0, "auto")

    vision = layout.vision_mask.nonzero().squeeze(1).tolist()  # packed indices of vision tokens, ascending
    rows = [[t for t in vision if layout.out_index[t] // layout.merged_len == b] for b in range(2)]
    assert [len(r) for r in rows] == [2 * P, P]
    r64 = x.double()[vision] @ weight.double()[0] + bias.double()  # [Nv] in packed order
    pos = {t: i for i, t in enumerate(vision)}
    w64 = _spec_norm(r64, norm, [[pos[t] for t in row] for row in rows])
    want_w = torch.ones(N, dtype=torch.float64)
    want_w[vision] = w64
    keep = set(range(N)) - set(vision)
    for row in rows:
        order = sorted(row, key=lambda t: -w64[pos[t]].item())
        keep |= set(order[: kept_count(len(row), ratio)])
    assert idx.tolist() == sorted(keep)
    torch.testing.assert_close(w_tok.double(), want_w, rtol=1e-6, atol=1e-6)
    assert sorted(kept[kept < N].tolist()) == sorted(keep & set(vision))

    h_mid, m = torch.randn(len(idx), C, generator=g), torch.randn(len(idx), C, generator=g)  # [Nk, C]
    out = pk.string_merge_op(x, w_tok, idx, h_mid, m, "auto")
    want = x.double() * want_w[:, None]
    want[idx] = h_mid.double() + want_w[idx, None] * m.double()
    torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("norm", pk.ELEMENTWISE_NORMS)
def test_reference_gradcheck(norm):
    x, weight, bias, rows = router_inputs(9, 5, "some")
    assert torch.autograd.gradcheck(lambda *a: ref.router_weights(*a, rows, norm, 0.2, 1.0),
                                    [t.requires_grad_() for t in (x, weight, bias)])
    x, w, idx, h, m = merge_inputs(9, 5, "some")
    assert torch.autograd.gradcheck(lambda x, w, h, m: ref.string_merge(x, w, idx, h, m),
                                    [t.requires_grad_() for t in (x, w, h, m)])
    assert torch.autograd.gradcheck(lambda x: ref.gather_rows(x, idx), [x])


def test_argument_errors_name_the_values():
    x, w, idx, h, m = merge_inputs(8, 4, "some")
    with pytest.raises(ValueError, match="softmax"):
        pk.router_weights(x, torch.zeros(1, 4, dtype=x.dtype), None, idx, "softmax")
    with pytest.raises(ValueError, match="cuda"):
        pk.string_merge(x, w, idx, h, m, backend="cuda")
    with pytest.raises(ValueError, match=r"h_mid \(2, 4\)"):
        pk.string_merge(x, w, idx, h[:2], m)


def test_pyproject_installs_kernels_as_pmod_kernels_and_every_package():
    """kernels/ ships as `pmod_kernels`, never as top-level `kernels` (Hugging Face's kernel hub on PyPI); since the
    rename forces an explicit package list, every folder of .py files under pmod/ must be on it (and the data-only
    packages of package-data, else setuptools warns)."""
    import tomllib

    repo = Path(__file__).parents[1]
    st = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert st.get("package-dir") == {"pmod_kernels": "kernels"}, st.get("package-dir")
    on_disk = {".".join(p.parent.relative_to(repo).parts) for p in (repo / "pmod").rglob("*.py")}
    data_only = set(st.get("package-data", {})) - on_disk
    assert data_only == {"pmod.assets", "pmod.serve.static"}, data_only
    assert set(st.get("packages", [])) == on_disk | data_only | {"pmod_kernels"}, "pyproject [tool.setuptools] packages is stale"
    assert Path(pk.__file__).parent.name in ("kernels", "pmod_kernels")


@pytest.mark.skipif(INTERPRETED or ON_CUDA or not HAS_TRITON, reason="the triton tests run in this process")
def test_kernels_in_interpreter():
    """Every test_triton_* test, on the CPU, in a subprocess that sets TRITON_INTERPRET=1 before triton loads."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "test_triton_"]
    repo = Path(__file__).parents[1]
    proc = subprocess.run(cmd, env=env, cwd=repo, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, f"interpreted triton tests failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-2000:]}"
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]


# ---------------------------------------------------------------------------------------------- triton


SIZES = [(97, 59, "some"), (97, 64, "none"), (33, 64, "all"), (1, 1, "all"), (40, 300, "some")]


@triton_only
@pytest.mark.parametrize("N,C,kept", SIZES)
def test_triton_string_merge_fp32(N, C, kept):
    inputs = merge_inputs(N, C, kept, torch.float32)
    out, grads = run(lambda *a: pk.string_merge(*a, backend="triton"), inputs)
    want, want_grads = run(ref.string_merge, inputs)
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    for name, g, wg in zip(("x", "w_tok", "idx", "h_mid", "m"), grads, want_grads):
        if wg is not None:
            torch.testing.assert_close(g, wg, rtol=1e-5, atol=1e-5, msg=lambda s, name=name: f"grad {name}: {s}")


@triton_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_string_merge_low_precision(dtype):
    inputs = merge_inputs(97, 59, "some", dtype)
    out, grads = run(lambda *a: pk.string_merge(*a, backend="triton"), inputs)
    want, want_grads = run(ref.string_merge, inputs)
    oracle, oracle_grads = run(ref.string_merge, [t.double() if t.is_floating_point() else t for t in inputs])
    if dtype == torch.float16 or not INTERPRETED:  # rounded where the eager ops round: identical
        assert torch.equal(out, want)
    assert_within_2x(out, want, oracle, "out")
    for name, g, wg, og in zip(("x", "w_tok", "idx", "h_mid", "m"), grads, want_grads, oracle_grads):
        if og is not None:
            assert_within_2x(g, wg, og, f"grad {name}")


@triton_only
@pytest.mark.parametrize("norm", pk.ELEMENTWISE_NORMS)
@pytest.mark.parametrize("N,C,kept", SIZES)
def test_triton_router_weights_fp32(norm, N, C, kept):
    inputs = router_inputs(N, C, kept, bias=kept != "none", dtype=torch.float32)
    out, grads = run(lambda *a: pk.router_weights(*a, norm, 0.2, 1.0, backend="triton"), inputs)
    want, want_grads = run(lambda *a: ref.router_weights(*a, norm, 0.2, 1.0), inputs)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    for name, g, wg in zip(("x", "weight", "bias"), grads, want_grads):
        if wg is not None:
            torch.testing.assert_close(g, wg, rtol=1e-5, atol=1e-5, msg=lambda s, name=name: f"grad {name}: {s}")


@triton_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_router_weights_low_precision(dtype):
    inputs = router_inputs(97, 59, "some", dtype=dtype)
    out, grads = run(lambda *a: pk.router_weights(*a, backend="triton"), inputs)
    want, want_grads = run(ref.router_weights, inputs)
    oracle, oracle_grads = run(ref.router_weights, [t.double() if t is not None and t.is_floating_point() else t
                                                    for t in inputs])
    assert_within_2x(out, want, oracle, "w")
    for name, g, wg, og in zip(("x", "weight", "bias"), grads, want_grads, oracle_grads):
        assert_within_2x(g, wg, og, f"grad {name}")


@triton_only
@pytest.mark.parametrize("N,C,kept", SIZES)
def test_triton_gather_rows_is_exact(N, C, kept):
    x, _, idx, _, _ = merge_inputs(N, C, kept, torch.bfloat16)
    out, (dx, _) = run(lambda *a: pk.gather_rows(*a, backend="triton"), (x, idx))
    want, (want_dx, _) = run(ref.gather_rows, (x, idx))
    assert torch.equal(out, want) and torch.equal(dx, want_dx)


@triton_only
def test_triton_gradcheck_fp64():
    """The hand-written backwards against finite differences of the Triton forwards themselves."""
    x, weight, bias, rows = router_inputs(7, 5, "some")
    for norm in pk.ELEMENTWISE_NORMS:
        assert torch.autograd.gradcheck(lambda *a, norm=norm: pk.router_weights(*a, rows, norm, backend="triton"),
                                        [t.requires_grad_() for t in (x, weight, bias)])
    x, w, idx, h, m = merge_inputs(7, 5, "some")
    assert torch.autograd.gradcheck(lambda x, w, h, m: pk.string_merge(x, w, idx, h, m, backend="triton"),
                                    [t.requires_grad_() for t in (x, w, h, m)])
    assert torch.autograd.gradcheck(lambda x: pk.gather_rows(x, idx, backend="triton"), [x])


def _mini_mod_layer(x, weight, bias, A, vision, k: int, backend: str):
    """One MoD layer on one row, the kernels composed as mod.py composes them; the 'layer' is a tanh MLP."""
    w_v = pk.router_weights(x, weight, bias, vision, backend=backend)  # [Nv]
    chosen = vision[w_v.detach().topk(k).indices]  # [k], selection carries no gradient
    keep = torch.ones(x.shape[0], dtype=torch.bool, device=x.device).index_fill(0, vision, False)
    idx = torch.nonzero(keep.index_fill(0, chosen, True)).squeeze(1)  # [Nk] ascending
    w_tok = torch.ones_like(x[:, 0]).index_copy(0, vision, w_v)  # [N], 1 on text
    h = pk.gather_rows(x, idx, backend=backend)  # [Nk, C]
    h_mid = h + torch.tanh(h @ A)
    return pk.string_merge(x, w_tok, idx, h_mid, torch.tanh(h_mid @ A.T), backend=backend)


@triton_only
@pytest.mark.parametrize("k", [0, 5, 12])
def test_triton_mini_mod_layer_matches_reference(k):
    """Outputs and gradients (router included, through w only) of the composed layer, with nothing/some/all kept."""
    x, weight, bias, _ = router_inputs(29, 24, "some", dtype=torch.float32)
    A = torch.randn(24, 24, generator=torch.Generator().manual_seed(3)).to(DEVICE) / 5
    vision = torch.arange(8, 20, device=DEVICE)  # 12 vision tokens between text
    got = run(lambda *a: _mini_mod_layer(*a, vision, k, "triton"), (x, weight, bias, A))
    want = run(lambda *a: _mini_mod_layer(*a, vision, k, "torch"), (x, weight, bias, A))
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    for name, g, wg in zip(("x", "router weight", "router bias", "A"), got[1], want[1]):
        torch.testing.assert_close(g, wg, rtol=1e-4, atol=1e-5, msg=lambda s, name=name: f"grad {name}: {s}")
