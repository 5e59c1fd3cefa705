"""merge_attention and gated_merge: every fused backend against the float64 reference, outputs and
every gradient, by relative RMS error (per-dtype tolerances in l2m_kernels.testing)."""
import math

import pytest
import torch

import l2m_kernels as l2m
from l2m_kernels.ops.merge.reference import gated_merge_ref, merge_attention_ref
from l2m_kernels.testing import (TOLERANCE, assert_close, fused_backend_params, lse_dtype, rand, rand_lse,
                                 skip_unless_served)

SHAPES = [(1, 1, 1, 1), (2, 3, 7, 63), (1, 2, 129, 7), (2, 1, 5, 129), (1, 1, 3, 512)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _merge_inputs(shape, dtype, device, special_rows=True):
    B, H, T, D = shape
    out_a, out_b = rand(B, H, T, D, dtype=dtype, device=device), rand(B, H, T, D, dtype=dtype, device=device)
    lse_a, lse_b = rand_lse(B, H, T, dtype=dtype, device=device), rand_lse(B, H, T, dtype=dtype, device=device)
    if special_rows and T >= 3:
        lse_a[..., 0] = float("-inf")                     # side A empty
        lse_b[..., 1] = float("-inf")                     # side B empty
        lse_a[..., 2] = lse_b[..., 2] = float("-inf")     # both empty
    return out_a, lse_a, out_b, lse_b


def _grads(fn, inputs, cotangents):
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    grads = torch.autograd.grad(outs, leaves, cotangents)
    return [o.detach() for o in outs], list(grads)


def _reference64(fn, inputs, cotangents):
    as64 = [x.detach().to(torch.float64).cpu() for x in inputs]
    cot64 = [c.detach().to(torch.float64).cpu() for c in cotangents]
    return _grads(fn, as64, cot64)


@pytest.mark.parametrize("backend,device", fused_backend_params("merge_attention"))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_merge_attention_matches_reference(backend, device, shape, dtype):
    skip_unless_served(backend, dtype)
    inputs = _merge_inputs(shape, dtype, device)
    dout = rand(*shape, dtype=dtype, device=device)
    dlse = rand(*shape[:3], dtype=lse_dtype(dtype), device=device)
    (out, lse), grads = _grads(lambda *x: l2m.merge_attention(*x, backend=backend), inputs, (dout, dlse))
    (ref_out, ref_lse), ref_grads = _reference64(merge_attention_ref, inputs, (dout, dlse))
    assert out.dtype == dtype and lse.dtype == lse_dtype(dtype)
    assert_close("out", out, ref_out, dtype)
    assert torch.equal(torch.isneginf(lse).cpu(), torch.isneginf(ref_lse))
    assert_close("lse", lse, ref_lse, dtype)
    for name, g, rg, x in zip(("d_out_a", "d_lse_a", "d_out_b", "d_lse_b"), grads, ref_grads, inputs):
        assert g.dtype == x.dtype
        assert_close(name, g, rg, dtype)
    if shape[2] >= 3:  # both sides empty: out = 0, lse = -inf, zero gradients
        assert torch.all(out[..., 2, :] == 0) and torch.all(torch.isneginf(lse[..., 2]))
        assert torch.all(grads[0][..., 2, :] == 0) and torch.all(grads[1][..., 2] == 0)


@pytest.mark.parametrize("backend,device", fused_backend_params("merge_attention"))
def test_merge_attention_nan_row_is_isolated(backend, device):
    out_a, lse_a, out_b, lse_b = _merge_inputs((1, 2, 9, 33), torch.float32, device, special_rows=False)
    out_a[0, 1, 4, 5] = float("nan")
    lse_b[0, 0, 7] = float("nan")
    lse_a[0, 1, 2], lse_b[0, 1, 2] = float("nan"), float("-inf")   # NaN beside an empty side
    out, lse = l2m.merge_attention(out_a, lse_a, out_b, lse_b, backend=backend)
    ref_out, ref_lse = merge_attention_ref(out_a, lse_a, out_b, lse_b)
    assert torch.isnan(out[0, 1, 4, 5]) and torch.isnan(lse[0, 0, 7]) and torch.isnan(out[0, 0, 7]).all()
    nan_rows = torch.zeros(1, 2, 9, dtype=torch.bool, device=device)
    nan_rows[0, 1, 4] = nan_rows[0, 0, 7] = nan_rows[0, 1, 2] = True
    assert torch.isnan(lse[0, 1, 2]) and torch.isnan(out[0, 1, 2]).all()
    assert torch.isfinite(out[~nan_rows]).all() and torch.isfinite(lse[~nan_rows]).all()
    assert_close("out", out[~nan_rows], ref_out[~nan_rows])


@pytest.mark.parametrize("backend,device", fused_backend_params("merge_attention"))
def test_merge_attention_empty_and_noncontiguous(backend, device):
    for shape in [(0, 2, 3, 8), (2, 2, 0, 8)]:
        out, lse = l2m.merge_attention(*_merge_inputs(shape, torch.float32, device), backend=backend)
        assert out.shape == shape and lse.shape == shape[:3]
    # D == 0 with rows: lse is still the merge of the two lse, gradients flow to them
    inputs = [t.requires_grad_() for t in _merge_inputs((2, 3, 4, 0), torch.float32, device)]
    out, lse = l2m.merge_attention(*inputs, backend=backend)
    ref_out, ref_lse = merge_attention_ref(*inputs)
    assert out.shape == (2, 3, 4, 0)
    assert_close("lse (D = 0)", lse, ref_lse)
    got = torch.autograd.grad(lse.sum(), (inputs[1], inputs[3]))
    want = torch.autograd.grad(ref_lse.sum(), (inputs[1], inputs[3]))
    for g, w in zip(got, want):
        assert_close("dlse (D = 0)", g, w)
    blended = l2m.gated_merge(inputs[0], inputs[2], torch.zeros(3, 1, 1), backend=backend)
    assert blended.shape == (2, 3, 4, 0)
    # Non-contiguous views (transposed head/time) are accepted and give the same result.
    base = _merge_inputs((2, 5, 4, 16), torch.float32, device, special_rows=False)
    views = [base[0].transpose(1, 2), base[1].transpose(1, 2), base[2].transpose(1, 2), base[3].transpose(1, 2)]
    assert not views[0].is_contiguous()
    out, lse = l2m.merge_attention(*views, backend=backend)
    ref_out, ref_lse = merge_attention_ref(*[t.contiguous() for t in views])
    assert_close("out", out, ref_out)
    assert_close("lse", lse, ref_lse)


GATE_SHAPES = [(), (1,), (3, 1, 1), (2, 3, 1, 1), (2, 3, 7, 1), (7, 1), (1, 1, 7, 1)]


@pytest.mark.parametrize("backend,device", fused_backend_params("gated_merge"))
@pytest.mark.parametrize("gate_shape", GATE_SHAPES, ids=lambda s: "g" + "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gated_merge_matches_reference(backend, device, gate_shape, dtype):
    skip_unless_served(backend, dtype)
    shape = (2, 3, 7, 63)
    inputs = (rand(*shape, dtype=dtype, device=device), rand(*shape, dtype=dtype, device=device),
              rand(*gate_shape, dtype=dtype, device=device, scale=2.0))
    dout = rand(*shape, dtype=dtype, device=device)
    (out,), grads = _grads(lambda *x: l2m.gated_merge(*x, backend=backend), inputs, (dout,))
    (ref_out,), ref_grads = _reference64(gated_merge_ref, inputs, (dout,))
    assert out.dtype == dtype
    assert_close("out", out, ref_out, dtype)
    for name, g, rg, x in zip(("d_out_local", "d_out_mem", "d_gate"), grads, ref_grads, inputs):
        assert g.shape == x.shape and g.dtype == x.dtype
        assert_close(name, g, rg, dtype)


@pytest.mark.parametrize("backend,device", fused_backend_params("gated_merge"))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gated_merge_shapes(backend, device, shape):
    B, H, T, D = shape
    inputs = (rand(*shape, device=device), rand(*shape, device=device), rand(B, H, T, 1, device=device))
    dout = rand(*shape, device=device)
    (out,), grads = _grads(lambda *x: l2m.gated_merge(*x, backend=backend), inputs, (dout,))
    (ref_out,), ref_grads = _reference64(gated_merge_ref, inputs, (dout,))
    assert_close("out", out, ref_out)
    for name, g, rg in zip(("d_out_local", "d_out_mem", "d_gate"), grads, ref_grads):
        assert_close(name, g, rg)


@pytest.mark.parametrize("backend,device", fused_backend_params("gated_merge"))
def test_gated_merge_empty_batch(backend, device):
    out = l2m.gated_merge(rand(0, 2, 3, 4, device=device), rand(0, 2, 3, 4, device=device),
                          rand(2, 1, 1, device=device, requires_grad=True), backend=backend)
    assert out.shape == (0, 2, 3, 4)


def test_tolerance_table_covers_every_dtype():
    assert set(TOLERANCE) == set(DTYPES)


def test_reference_merge_matches_logaddexp_float64():
    out_a, lse_a, out_b, lse_b = _merge_inputs((2, 2, 5, 6), torch.float64, "cpu", special_rows=False)
    out, lse = merge_attention_ref(out_a, lse_a, out_b, lse_b)
    want_lse = torch.logaddexp(lse_a, lse_b)
    want = (lse_a - want_lse).exp()[..., None] * out_a + (lse_b - want_lse).exp()[..., None] * out_b
    torch.testing.assert_close(lse, want_lse)
    torch.testing.assert_close(out, want)


def test_reference_merge_is_attention_over_the_union():
    # Brute force: softmax attention over keys A ∪ B equals the merge of the two partial attentions.
    torch.manual_seed(1)
    q = torch.randn(1, 1, 4, 8, dtype=torch.float64)
    ka, va = torch.randn(1, 1, 5, 8, dtype=torch.float64), torch.randn(1, 1, 5, 3, dtype=torch.float64)
    kb, vb = torch.randn(1, 1, 6, 8, dtype=torch.float64), torch.randn(1, 1, 6, 3, dtype=torch.float64)

    def attend(k, v):
        s = q @ k.transpose(-1, -2)
        return s.softmax(-1) @ v, s.logsumexp(-1)

    out, lse = merge_attention_ref(*attend(ka, va), *attend(kb, vb))
    want, want_lse = attend(torch.cat([ka, kb], 2), torch.cat([va, vb], 2))
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(lse, want_lse)


def test_reference_merge_gradcheck():
    out_a, lse_a, out_b, lse_b = _merge_inputs((1, 2, 3, 4), torch.float64, "cpu", special_rows=False)
    gate = torch.randn(2, 1, 1, dtype=torch.float64)
    args = [t.requires_grad_() for t in (out_a, lse_a, out_b, lse_b)]
    assert torch.autograd.gradcheck(merge_attention_ref, args)
    assert torch.autograd.gradcheck(gated_merge_ref, (args[0], args[2], gate.requires_grad_()))


@pytest.mark.parametrize("backend,device", fused_backend_params("merge_attention"))
def test_merge_ops_are_bitwise_deterministic(backend, device):
    inputs = _merge_inputs((2, 3, 9, 40), torch.float32, device)
    dout, dlse = rand(2, 3, 9, 40, device=device), rand(2, 3, 9, device=device)
    (o1, l1), g1 = _grads(lambda *x: l2m.merge_attention(*x, backend=backend), inputs, (dout, dlse))
    (o2, l2), g2 = _grads(lambda *x: l2m.merge_attention(*x, backend=backend), inputs, (dout, dlse))
    gate_in = (inputs[0], inputs[2], rand(3, 1, 1, device=device))
    (m1,), h1 = _grads(lambda *x: l2m.gated_merge(*x, backend=backend), gate_in, (dout,))
    (m2,), h2 = _grads(lambda *x: l2m.gated_merge(*x, backend=backend), gate_in, (dout,))
    for a, b in zip([o1, l1, m1, *g1, *h1], [o2, l2, m2, *g2, *h2]):
        assert torch.equal(a.nan_to_num(), b.nan_to_num())


try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - hypothesis is a test dependency
    given = None

if given is not None:
    @pytest.mark.parametrize("backend,device", fused_backend_params("merge_attention"))
    @settings(max_examples=15, deadline=None)
    @given(B=st.integers(1, 2), H=st.integers(1, 3), T=st.integers(1, 9), D=st.integers(1, 70),
           seed=st.integers(0, 2**31 - 1))
    def test_merge_is_associative_and_equals_union_attention(backend, device, B, H, T, D, seed):
        """Property: attention over three disjoint key sets, merged in either order, equals the
        attention over their union (float64 brute force)."""
        gen = torch.Generator().manual_seed(seed)
        q = torch.randn(B, H, T, D, generator=gen, dtype=torch.float64)
        parts = []
        for n in (3, 1, 5):
            k = torch.randn(B, H, n, D, generator=gen, dtype=torch.float64)
            v = torch.randn(B, H, n, D, generator=gen, dtype=torch.float64)
            parts.append((k, v))

        def attend(k, v):
            s = q @ k.transpose(-1, -2) / math.sqrt(D)
            return s.softmax(-1) @ v, s.logsumexp(-1)

        (oa, la), (ob, lb), (oc, lc) = [attend(k, v) for k, v in parts]
        want, want_lse = attend(torch.cat([p[0] for p in parts], 2), torch.cat([p[1] for p in parts], 2))
        f32 = lambda o, l: (o.float().to(device), l.float().to(device))  # noqa: E731
        ab = l2m.merge_attention(*f32(oa, la), *f32(ob, lb), backend=backend)
        left = l2m.merge_attention(*ab, *f32(oc, lc), backend=backend)
        bc = l2m.merge_attention(*f32(ob, lb), *f32(oc, lc), backend=backend)
        right = l2m.merge_attention(*f32(oa, la), *bc, backend=backend)
        for out, lse in (left, right):
            assert_close("out", out, want, torch.float32)
            assert_close("lse", lse, want_lse, torch.float32)


@pytest.mark.parametrize("backend,device", fused_backend_params("gated_merge") + [pytest.param("reference", "cpu")])
def test_gated_merge_saturated_gate_keeps_precision(backend, device):
    # 1 - sigmoid(9) = 1.2e-4: as 1 - g in float32 it kept 3 digits (the cpu kernel and the reference
    # had 1e-4 relative errors in d_out_local and out's local share); sigmoid(-gate) keeps them all.
    g = torch.Generator().manual_seed(3)
    shape = (2, 3, 5, 16)
    inputs = (torch.randn(shape, generator=g), torch.randn(shape, generator=g),
              9.0 + 0.1 * torch.randn(3, 1, 1, generator=g))
    dout = torch.randn(shape, generator=g)
    (out,), grads = _grads(lambda *x: l2m.gated_merge(*x, backend=backend), [x.to(device) for x in inputs],
                           (dout.to(device),))
    (ref_out,), ref_grads = _reference64(gated_merge_ref, inputs, (dout,))
    assert_close("out", out, ref_out)
    assert_close("d_out_local", grads[0], ref_grads[0])
    assert_close("d_out_mem", grads[1], ref_grads[1])


@pytest.mark.parametrize("backend,device", fused_backend_params("merge_attention") + [pytest.param("reference", "cpu")])
def test_merge_attention_infinite_lse(backend, device):
    # lse = logaddexp(lse_a, lse_b) is +inf when a side is +inf, also both; NaN stays NaN. The
    # reference gave NaN for every +inf and the kernels for (+inf, +inf), from exp(inf - inf) (found
    # by the fuzzer).
    inf, nan = float("inf"), float("nan")
    lse_a = torch.tensor([[[inf, 1.0, -inf, inf, nan, inf, -inf]]])
    lse_b = torch.tensor([[[1.0, inf, inf, inf, inf, nan, -inf]]])
    out_a, out_b = rand(1, 1, 7, 3), rand(1, 1, 7, 3)
    out, lse = l2m.merge_attention(out_a.to(device), lse_a.to(device), out_b.to(device), lse_b.to(device),
                                   backend=backend)
    want = torch.tensor([[[inf, inf, inf, inf, nan, nan, -inf]]])
    assert torch.equal(lse.cpu().nan_to_num(nan=7.0), want.nan_to_num(nan=7.0)), lse
    assert torch.isnan(out[0, 0, :6]).all() and torch.equal(out[0, 0, 6].cpu(), torch.zeros(3))


@pytest.mark.parametrize("backend,device", fused_backend_params("merge_attention"))
def test_eager_entry_equals_the_custom_op(backend, device):
    # A public call outside torch.compile runs the launchers under an autograd.Function of the op's
    # own formula (no dispatcher); the custom op is what torch.compile traces. Both must give the same
    # bits, outputs and every gradient, with the graph node saying which path ran.
    gen = torch.Generator().manual_seed(3)
    shape = (2, 3, 37, 24)
    inputs = [t.to(device) for t in _merge_inputs(shape, torch.float32, "cpu")]
    gate = torch.randn(3, 1, 1, generator=gen).to(device)
    cases = [
        (lambda *x: l2m.merge_attention(*x, backend=backend),
         lambda *x: torch.ops.l2m.merge_attention(*x, backend), inputs, "merge_attention_eager"),
        (lambda *x: l2m.gated_merge(*x, backend=backend),
         lambda *x: torch.ops.l2m.gated_merge(*x, backend), [inputs[0], inputs[2], gate], "gated_merge_eager"),
    ]
    for public, custom_op, args, node in cases:
        leaves = [x.detach().clone().requires_grad_(True) for x in args]
        outs = public(*leaves)
        outs = outs if isinstance(outs, tuple) else (outs,)
        assert type(outs[0].grad_fn).__name__.startswith(node)
        cot = [torch.randn(o.shape, generator=gen).to(device) for o in outs]
        grads = torch.autograd.grad(outs, leaves, cot)
        op_outs, op_grads = _grads(custom_op, args, cot)
        for actual, expected in zip(list(outs) + list(grads), op_outs + op_grads):
            assert torch.equal(actual.detach(), expected)
        with torch.no_grad():
            plain = public(*leaves)
        plain = plain if isinstance(plain, tuple) else (plain,)
        assert all(p.grad_fn is None and torch.equal(p, o.detach()) for p, o in zip(plain, outs))
