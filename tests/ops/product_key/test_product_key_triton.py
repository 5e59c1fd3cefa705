"""Triton product-key read launchers against the reference, on CUDA when present, else under the
interpreter (tests/conftest.py sets TRITON_INTERPRET=1 when there is no GPU).

Calls ``product_key_fwd`` / ``product_key_bwd`` directly with outputs pre-filled with NaN (indices
with a sentinel), so any element a kernel forgets to write fails; the last tests go through
``l2m.product_key_read(backend="triton")`` with the suite's poisoned allocations. Shapes are tiny:
the interpreter runs every program in Python.
"""

import pytest
import torch

pytest.importorskip("triton")

import l2m_kernels as l2m  # noqa: E402
from l2m_kernels.ops.product_key import triton as pk_triton  # noqa: E402
from l2m_kernels.ops.product_key.reference import product_key_gather, product_key_read_ref  # noqa: E402
from l2m_kernels.testing import assert_close  # noqa: E402
from .._triton import DEVICE, INTERPRETER_WARNINGS, skip_module_unless_interpreted  # noqa: E402

skip_module_unless_interpreted(pk_triton, "product_key_fwd_select_kernel")
pytestmark = INTERPRETER_WARNINGS

NAN = float("nan")
INDEX_SENTINEL = -(2**31) + 7


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def _randn(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float32, device=DEVICE) * scale).to(dtype)


def _inputs(B, H, T, Dk, n_sub, Dv, dtype=torch.float32):
    return (_randn(B, H, T, Dk, dtype=dtype), _randn(H, 2, n_sub, Dk // 2, dtype=dtype),
            _randn(n_sub * n_sub, Dv, dtype=dtype))


def _fwd(q, subkeys, values, k, k_sub, scale, sum_heads):
    """Run the triton forward into NaN/sentinel-filled outputs."""
    B, H, T, _ = q.shape
    Dv = values.shape[-1]
    out = torch.full((B, T, Dv) if sum_heads else (B, H, T, Dv), NAN, dtype=q.dtype, device=DEVICE)
    indices = torch.full((B, H, T, k), INDEX_SENTINEL, dtype=torch.int64, device=DEVICE)
    weights = torch.full((B, H, T, k), NAN, dtype=torch.float32, device=DEVICE)
    lse = torch.full((B, H, T), NAN, dtype=torch.float32, device=DEVICE)
    pk_triton.product_key_fwd(q, subkeys, values, k, k_sub, scale, sum_heads, out, indices, weights, lse)
    return out, indices, weights, lse


def _bwd(q, subkeys, values, indices, weights, scale, sum_heads, cotangents, sparse_grad, deterministic):
    """Run the triton backward into NaN-filled gradients."""
    dout, dweights, dlse = cotangents
    dvalues_shape = (indices.numel(), values.shape[-1]) if sparse_grad else values.shape
    grads = [torch.full_like(q, NAN), torch.full_like(subkeys, NAN),
             torch.full(dvalues_shape, NAN, dtype=values.dtype, device=DEVICE)]
    pk_triton.product_key_bwd(dout, dweights, dlse, q, subkeys, values, indices, weights, scale, sum_heads,
                              sparse_grad, deterministic, *grads)
    return grads


def _cotangents(q, values, k, sum_heads):
    B, H, T, _ = q.shape
    Dv = values.shape[-1]
    return (_randn(*((B, T, Dv) if sum_heads else (B, H, T, Dv)), dtype=q.dtype),
            _randn(B, H, T, k), _randn(B, H, T))


def _check_fwd(q, subkeys, values, k, k_sub, scale, sum_heads=False):
    """Forward against the reference (same input dtype); returns the triton outputs."""
    got = _fwd(q, subkeys, values, k, k_sub, scale, sum_heads)
    ref_out, ref_indices, ref_weights, ref_lse = product_key_read_ref(q, subkeys, values, k, k_sub, scale,
                                                                      sum_heads)
    assert torch.equal(got[1], ref_indices), f"indices differ:\n{got[1]}\nvs\n{ref_indices}"
    assert got[0].dtype == q.dtype
    assert_close("out", got[0], ref_out, dtype=q.dtype)
    assert_close("weights", got[2], ref_weights, dtype=q.dtype)
    assert_close("lse", got[3], ref_lse, dtype=q.dtype)
    return got


def _reference_grads(q, subkeys, values, indices, scale, sum_heads, cotangents):
    """torch.autograd.grad of the float64 reference gather at the selected slots."""
    leaves = [t.detach().to(torch.float64).requires_grad_() for t in (q, subkeys, values)]
    ref = product_key_gather(*leaves, indices, scale, sum_heads=sum_heads)
    return torch.autograd.grad(ref, leaves, [c.to(torch.float64) for c in cotangents])


def _dense_from_rows(rows, indices, num_slots):
    dense = torch.zeros(num_slots, rows.shape[-1], dtype=torch.float64, device=DEVICE)
    return dense.index_add_(0, indices.reshape(-1), rows.to(torch.float64))


def _check_bwd(q, subkeys, values, k, k_sub, scale, sum_heads, sparse_grad, deterministic):
    out, indices, weights, lse = _check_fwd(q, subkeys, values, k, k_sub, scale, sum_heads)
    cotangents = _cotangents(q, values, k, sum_heads)
    grads = _bwd(q, subkeys, values, indices, weights, scale, sum_heads, cotangents, sparse_grad, deterministic)
    ref_grads = _reference_grads(q, subkeys, values, indices, scale, sum_heads, cotangents)
    for grad in grads:
        assert grad.dtype == q.dtype
    assert_close("dq", grads[0], ref_grads[0], dtype=q.dtype)
    assert_close("dsubkeys", grads[1], ref_grads[1], dtype=q.dtype)
    if sparse_grad:
        # One row per (b, h, t, j) entry: weights * dout of its (head-summed) output row.
        dout = cotangents[0].to(torch.float64)
        dout = dout.unsqueeze(1) if sum_heads else dout
        want_rows = (weights.to(torch.float64).unsqueeze(-1) * dout.unsqueeze(-2)).reshape(-1, values.shape[-1])
        assert grads[2].shape == want_rows.shape
        assert_close("dvalue rows", grads[2], want_rows, dtype=q.dtype)
        assert_close("dvalues", _dense_from_rows(grads[2], indices, values.shape[0]), ref_grads[2],
                     dtype=q.dtype)
    else:
        assert_close("dvalues", grads[2], ref_grads[2], dtype=q.dtype)
    return grads, indices, weights, cotangents


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------

# (B, H, T, Dk, n_sub, Dv, k, k_sub)
FWD_CASES = [
    (1, 2, 7, 14, 7, 7, 5, 3),        # odd sizes everywhere
    (2, 1, 3, 2, 33, 1, 8, 4),        # Dk = 2 (one feature per half), Dv = 1, several sub-key tiles
    (1, 1, 5, 6, 7, 3, 49, 7),        # k = k_sub ** 2 and k_sub = n_sub: every slot
    (1, 2, 4, 16, 9, 4, 1, 1),        # k = k_sub = 1
    (1, 1, 3, 8, 33, 129, 1, 33),     # k = 1 with k_sub = n_sub; Dv > 128 (two feature blocks)
    (1, 1, 3, 36, 20, 5, 40, 20),     # K_PAD 64 candidates over several tiles (bound skip)
    (1, 1, 2, 300, 17, 6, 3, 17),     # Dk // 2 > 128: feature chunk loop in the half scores
    (1, 1, 2, 8, 16, 4, 200, 15),     # K_PAD 256: candidate tiles padded into the widest list
]


def _case_id(case):
    B, H, T, Dk, n_sub, Dv, k, k_sub = case
    return f"B{B}H{H}T{T}Dk{Dk}n{n_sub}Dv{Dv}k{k}ks{k_sub}"


@pytest.mark.parametrize("sum_heads", [False, True], ids=["per_head", "sum_heads"])
@pytest.mark.parametrize("case", FWD_CASES, ids=_case_id)
def test_forward_matches_reference(case, sum_heads):
    B, H, T, Dk, n_sub, Dv, k, k_sub = case
    q, subkeys, values = _inputs(B, H, T, Dk, n_sub, Dv)
    _check_fwd(q, subkeys, values, k, k_sub, Dk ** -0.5, sum_heads)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_forward_half(dtype):
    q, subkeys, values = _inputs(1, 2, 5, 24, 9, 10, dtype=dtype)
    _check_fwd(q, subkeys, values, 6, 4, 24 ** -0.5, sum_heads=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_exact_ties_follow_the_smaller_slot(dtype):
    """Integer data with power-of-two scales: exactly equal scores in both halves and candidates."""
    B, H, T, Dk, n_sub = 1, 2, 7, 8, 9
    q = torch.randint(-2, 3, (B, H, T, Dk), device=DEVICE).to(dtype)
    subkeys = torch.randint(-1, 2, (H, 2, n_sub, Dk // 2), device=DEVICE).to(dtype)
    values = _randn(n_sub * n_sub, 5, dtype=dtype)
    for k, k_sub, scale in ((1, 1, 1.0), (7, 3, 0.5), (20, 5, 0.25), (81, 9, 1.0)):
        _check_fwd(q, subkeys, values, k, k_sub, scale)


def test_rounding_ties_across_first_half():
    """Second-half scores so large that the first half is absorbed: candidates from different
    first-half entries tie exactly after rounding, and the smaller slot must win (the tile bound
    may only skip strictly worse tiles)."""
    B, H, T, Dk, n_sub, k_sub = 1, 1, 4, 4, 12, 8
    q = _randn(B, H, T, Dk)
    q[..., Dk // 2:] *= 1e9     # ulp(1e9) = 64 in float32: the first-half scores (|s1| < 10) vanish
    subkeys = _randn(H, 2, n_sub, Dk // 2)
    values = _randn(n_sub * n_sub, 3)
    for k in (2, 5, 30):
        _check_fwd(q, subkeys, values, k, k_sub, 1.0)


def test_nan_query_rows_are_isolated():
    B, H, T, Dk, n_sub, k, k_sub = 2, 2, 5, 8, 9, 5, 3
    q, subkeys, values = _inputs(B, H, T, Dk, n_sub, 4)
    q[0, 1, 2, 1] = NAN     # first half: all its first-half scores NaN
    q[1, 0, 4, 6] = NAN     # second half
    for sum_heads in (False, True):
        out, indices, weights, lse = _check_fwd(q, subkeys, values, k, k_sub, 0.25, sum_heads)
        bad = torch.zeros(B, H, T, dtype=torch.bool, device=DEVICE)
        bad[0, 1, 2] = bad[1, 0, 4] = True
        assert torch.isnan(lse[bad]).all() and torch.isnan(weights[bad]).all()
        assert torch.isfinite(lse[~bad]).all() and torch.isfinite(weights[~bad]).all()
        out_bad = bad.any(1) if sum_heads else bad
        assert torch.isnan(out[out_bad]).all() and torch.isfinite(out[~out_bad]).all()
    # NaN scores rank first, ties by the smaller sub-key: the NaN half selects sub-keys 0 .. k_sub-1.
    assert torch.all(indices[0, 1, 2] // n_sub < k_sub)
    assert torch.all(indices[1, 0, 4] % n_sub < k_sub)


def test_empty_batch():
    H, Dk, n_sub, Dv, k = 2, 8, 5, 4, 3
    for B, T in ((0, 3), (2, 0)):
        q, subkeys, values = _inputs(B, H, T, Dk, n_sub, Dv)
        for sum_heads in (False, True):
            out, indices, weights, lse = _fwd(q, subkeys, values, k, k, 0.5, sum_heads)
            assert out.numel() == 0 and indices.numel() == 0
            for sparse_grad in (False, True):
                grads = _bwd(q, subkeys, values, indices, weights, 0.5, sum_heads,
                             _cotangents(q, values, k, sum_heads), sparse_grad, False)
                assert torch.all(grads[1] == 0)
                assert grads[2].numel() == 0 if sparse_grad else torch.all(grads[2] == 0)
    # sum_heads over no heads: zeros.
    q, subkeys, values = _inputs(2, 0, 3, Dk, n_sub, Dv)
    out, *_ = _fwd(q, subkeys, values, k, k, 0.5, True)
    assert out.shape == (2, 3, Dv) and torch.all(out == 0)


def test_limits_are_refused():
    q, subkeys, values = _inputs(1, 1, 2, 4, 17, 2)
    with pytest.raises(ValueError, match="k:"):
        _fwd(q, subkeys, values, 257, 17, 1.0, False)
    with pytest.raises(ValueError, match="k_sub"):
        _fwd(q, subkeys, values, 4, 18, 1.0, False)


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------

# (B, H, T, Dk, n_sub, Dv, k, k_sub)
BWD_CASES = [
    (1, 2, 7, 14, 7, 7, 5, 3),
    (2, 1, 3, 2, 33, 129, 4, 2),      # Dk = 2, Dv > 128 (feature chunk loops)
    (1, 1, 4, 6, 5, 3, 25, 5),        # k = k_sub ** 2 = n_sub ** 2: every slot
]


@pytest.mark.parametrize("mode", ["atomic", "deterministic", "sparse", "sparse-deterministic"])
@pytest.mark.parametrize("sum_heads", [False, True], ids=["per_head", "sum_heads"])
@pytest.mark.parametrize("case", BWD_CASES, ids=_case_id)
def test_backward_matches_autograd(case, sum_heads, mode):
    B, H, T, Dk, n_sub, Dv, k, k_sub = case
    q, subkeys, values = _inputs(B, H, T, Dk, n_sub, Dv)
    grads, indices, _, _ = _check_bwd(q, subkeys, values, k, k_sub, Dk ** -0.5, sum_heads,
                                      sparse_grad=mode.startswith("sparse"),
                                      deterministic=mode.endswith("deterministic"))
    # Sub-keys and slots nobody selected get exact zeros.
    touched = torch.zeros(H, 2, n_sub, dtype=torch.bool, device=DEVICE)
    heads = torch.arange(H, device=DEVICE)[None, :, None, None].expand_as(indices)
    touched[heads, 0, indices // n_sub] = True
    touched[heads, 1, indices % n_sub] = True
    assert torch.all(grads[1][~touched] == 0)
    if not mode.startswith("sparse"):
        slot_touched = torch.zeros(n_sub * n_sub, dtype=torch.bool, device=DEVICE)
        slot_touched[indices.reshape(-1)] = True
        assert torch.all(grads[2][~slot_touched] == 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_backward_half(dtype, deterministic):
    q, subkeys, values = _inputs(1, 2, 4, 24, 7, 10, dtype=dtype)
    _check_bwd(q, subkeys, values, 5, 3, 24 ** -0.5, True, sparse_grad=False, deterministic=deterministic)


def test_backward_nan_row_isolated():
    q, subkeys, values = _inputs(1, 1, 5, 8, 6, 4)
    q[0, 0, 1, 0] = NAN
    out, indices, weights, lse = _fwd(q, subkeys, values, 3, 3, 0.25, False)
    grads = _bwd(q, subkeys, values, indices, weights, 0.25, False, _cotangents(q, values, 3, False), False, True)
    assert torch.isnan(grads[0][0, 0, 1]).all()
    assert torch.isfinite(grads[0][0, 0, [0, 2, 3, 4]]).all()


@pytest.mark.parametrize("sum_heads", [False, True], ids=["per_head", "sum_heads"])
def test_deterministic_is_bitwise_reproducible(sum_heads):
    B, H, T, Dk, n_sub, Dv, k, k_sub = 2, 2, 6, 8, 4, 5, 6, 3   # few slots: many entries share each row
    q, subkeys, values = _inputs(B, H, T, Dk, n_sub, Dv)
    out, indices, weights, lse = _fwd(q, subkeys, values, k, k_sub, 0.5, sum_heads)
    again = _fwd(q, subkeys, values, k, k_sub, 0.5, sum_heads)
    for a, b in zip((out, indices, weights, lse), again):
        assert torch.equal(a, b)
    cotangents = _cotangents(q, values, k, sum_heads)
    args = (q, subkeys, values, indices, weights, 0.5, sum_heads, cotangents)
    first = _bwd(*args, False, True)
    second = _bwd(*args, False, True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    atomic = _bwd(*args, False, False)
    for name, a, b in zip(("dq", "dsubkeys", "dvalues"), atomic, first):
        assert_close(name, a, b, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# Through the public API (poisoned allocations, autograd, sparse coalescing)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sparse_grad", [False, True], ids=["dense", "sparse"])
def test_public_api_matches_reference(sparse_grad):
    B, H, T, Dk, n_sub, Dv, k, k_sub = 1, 2, 5, 8, 6, 4, 4, 3
    q, subkeys, values = (t.requires_grad_() for t in _inputs(B, H, T, Dk, n_sub, Dv))
    read = l2m.product_key_read(q, subkeys, values, k, k_sub=k_sub, sum_heads=True, sparse_grad=sparse_grad,
                                backend="triton")
    want = product_key_read_ref(q, subkeys, values, k, k_sub=k_sub, sum_heads=True, sparse_grad=sparse_grad)
    assert torch.equal(read.indices, want[1])
    for name, got, ref in zip(("out", "weights", "lse"), (read.out, read.weights, read.lse),
                              (want[0], want[2], want[3])):
        assert_close(name, got, ref, dtype=torch.float32)
    loss_weights = [_randn(*t.shape) for t in (read.out, read.weights, read.lse)]

    def loss(out, weights, lse):
        return sum((t * w).sum() for t, w in zip((out, weights, lse), loss_weights))

    grads = torch.autograd.grad(loss(read.out, read.weights, read.lse), (q, subkeys, values))
    ref_grads = torch.autograd.grad(loss(want[0], want[2], want[3]), (q, subkeys, values))
    assert grads[2].is_sparse == sparse_grad
    if sparse_grad:
        assert torch.equal(grads[2].indices(), ref_grads[2].coalesce().indices())
    for name, got, ref in zip(("dq", "dsubkeys", "dvalues"), grads, ref_grads):
        got = got.to_dense() if got.is_sparse else got
        ref = ref.to_dense() if ref.is_sparse else ref
        assert_close(name, got, ref, dtype=torch.float32)
