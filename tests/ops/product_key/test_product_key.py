"""product_key_read: every fused backend against the reference, outputs and every gradient.

Selection is compared robustly: the fused indices must be a valid product-key top-k of the float64
half scores (each chosen sub-key within the k_sub best of its half, every chosen candidate at least
as good as every candidate left out, descending order, all up to rounding) and agree exactly with
the reference on exactly representable (integer-valued, tied) data. Values, weights, lse and the
gradients (dq, dsubkeys, dvalues dense and sparse) are compared with the float64 reference
evaluated at the fused selection, by relative RMS error. Outputs are NaN-poisoned (conftest).
"""
import importlib

import pytest
import torch

import l2m_kernels as l2m
from l2m_kernels.ops.product_key.reference import product_key_gather, product_key_read_ref
from l2m_kernels.testing import (assert_close, assert_outputs_and_grads_close, assert_valid_topk,
                                 fused_backend_params, lse_dtype, product_key_scores, rand,
                                 skip_unless_served)
from .._triton import skip_heavy_case_under_interpreter

BACKENDS = fused_backend_params("product_key_read")
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]

# (B, H, T, Dk, n_sub, Dv, k, k_sub, sum_heads)
CASES = [
    (1, 1, 7, 2, 7, 1, 3, 3, False),       # Dk = 2, Dv = 1
    (2, 2, 7, 14, 33, 7, 5, 4, True),
    (1, 2, 63, 130, 7, 129, 49, 7, False),  # k = k_sub ** 2, k_sub = n_sub
    (2, 1, 63, 14, 33, 7, 1, 8, True),      # k = 1
    (1, 3, 9, 16, 33, 16, 32, 33, False),   # k_sub = n_sub
    (1, 2, 7, 130, 33, 129, 16, 16, True),
]


def _case_id(case):
    B, H, T, Dk, n_sub, Dv, k, k_sub, sum_heads = case
    return f"B{B}H{H}T{T}Dk{Dk}n{n_sub}Dv{Dv}k{k}ks{k_sub}" + ("-sum" if sum_heads else "")

# The largest cases: several seconds each under the Triton interpreter.
INTERPRETER_HEAVY = CASES[2:3]


def _inputs(case, dtype, device, requires_grad=True):
    B, H, T, Dk, n_sub, Dv, k, k_sub, sum_heads = case
    q = rand(B, H, T, Dk, dtype=dtype, device=device, requires_grad=requires_grad)
    subkeys = rand(H, 2, n_sub, Dk // 2, dtype=dtype, device=device, requires_grad=requires_grad)
    values = rand(n_sub * n_sub, Dv, dtype=dtype, device=device, requires_grad=requires_grad)
    return q, subkeys, values


def _leaves64(*tensors):
    return [t.detach().double().cpu().requires_grad_() for t in tensors]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_product_key_matches_reference(backend, device, case, dtype):
    skip_unless_served(backend, dtype)
    skip_heavy_case_under_interpreter(backend, device, dtype, case in INTERPRETER_HEAVY)
    B, H, T, Dk, n_sub, Dv, k, k_sub, sum_heads = case
    q, subkeys, values = _inputs(case, dtype, device)
    scale = Dk ** -0.5
    read = l2m.product_key_read(q, subkeys, values, k, k_sub=k_sub, sum_heads=sum_heads, backend=backend)
    assert read.out.shape == ((B, T, Dv) if sum_heads else (B, H, T, Dv))
    assert read.out.dtype == dtype and read.indices.dtype == torch.int64
    assert read.weights.dtype == lse_dtype(dtype) and read.lse.dtype == lse_dtype(dtype)
    assert read.indices.shape == (B, H, T, k)
    scores, selectable, candidates = product_key_scores(q, subkeys, k_sub, scale, score_dtype=dtype)
    assert_valid_topk(read.indices, scores, selectable=selectable, competitors=candidates, score_dtype=dtype)

    leaves64 = _leaves64(q, subkeys, values)
    ref_out, ref_w, ref_lse = product_key_gather(*leaves64, read.indices.cpu(), scale, sum_heads=sum_heads)
    grads = assert_outputs_and_grads_close((read.out, read.weights, read.lse), (q, subkeys, values),
                                           (ref_out, ref_w, ref_lse), leaves64, dtype,
                                           output_names=("out", "weights", "lse"),
                                           input_names=("dq", "dsubkeys", "dvalues"))
    assert all(g.layout == torch.strided for g in grads)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("sum_heads", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_product_key_sparse_grad(backend, device, sum_heads, dtype):
    case = (2, 2, 9, 14, 7, 7, 6, 4, sum_heads)  # 36 entries per (b, t) over 49 slots: repeats
    q, subkeys, values = _inputs(case, dtype, device)
    read = l2m.product_key_read(q, subkeys, values, 6, k_sub=4, sum_heads=sum_heads, sparse_grad=True,
                                backend=backend)
    dout = rand(*read.out.shape, dtype=dtype, device=device)
    dq, dsubkeys, dvalues = torch.autograd.grad((read.out * dout).sum() + read.lse.sum(), (q, subkeys, values))
    assert dvalues.is_sparse and dvalues.is_coalesced() and dvalues.dtype == dtype
    assert dvalues.shape == values.shape
    touched = torch.unique(read.indices.cpu())
    assert torch.equal(dvalues.indices().cpu()[0], touched), "sparse gradient rows != touched slots"

    leaves64 = _leaves64(q, subkeys, values)
    ref_out, _, ref_lse = product_key_gather(*leaves64, read.indices.cpu(), q.shape[-1] ** -0.5,
                                             sum_heads=sum_heads)
    ref = torch.autograd.grad((ref_out * dout.double().cpu()).sum() + ref_lse.sum(), leaves64)
    assert_close("dq", dq, ref[0], dtype)
    assert_close("dsubkeys", dsubkeys, ref[1], dtype)
    assert_close("dvalues", dvalues.to_dense(), ref[2], dtype)
    # The dense path's gradient (up to summation order), and the reference's own sparse path.
    read_dense = l2m.product_key_read(q, subkeys, values, 6, k_sub=4, sum_heads=sum_heads, backend=backend)
    dense = torch.autograd.grad((read_dense.out * dout).sum() + read_dense.lse.sum(), values)[0]
    assert_close("dvalues vs dense", dvalues.to_dense(), dense, dtype)
    ref_sparse = l2m.product_key_read(q, subkeys, values, 6, k_sub=4, sum_heads=sum_heads, sparse_grad=True,
                                      backend="reference")
    ref_dv = torch.autograd.grad((ref_sparse.out * dout).sum(), values)[0]
    assert torch.equal(ref_dv.indices(), dvalues.indices())
    assert_close("dvalues vs reference sparse", dvalues.values(), ref_dv.values(), dtype)


_CPU_REASONS = l2m.backends.BACKENDS["cpu"].not_supported_reasons("product_key_read", torch.device("cpu"),
                                                                  torch.float32)


def _sparse_backward_peak(n_sub, backend):
    """Peak bytes the backward of a sparse_grad read adds, at fixed queries and a memory of n_sub**2 rows."""
    from l2m_kernels.benchmark import peak_memory_bytes

    torch.manual_seed(0)
    B, H, T, Dk, Dv, k = 1, 2, 64, 16, 32, 8
    q = rand(B, H, T, Dk, requires_grad=True)
    subkeys = rand(H, 2, n_sub, Dk // 2, requires_grad=True)
    values = rand(n_sub ** 2, Dv, requires_grad=True)
    read = l2m.product_key_read(q, subkeys, values, k, sparse_grad=True, backend=backend)
    dout = rand(*read.out.shape)
    peak = peak_memory_bytes(lambda: torch.autograd.grad(read.out, values, dout), torch.device("cpu"))
    return peak, B * H * T * k * Dv * 4, n_sub ** 2 * Dv * 4


@pytest.mark.skipif(bool(_CPU_REASONS), reason="cpu: " + "; ".join(_CPU_REASONS))
def test_product_key_sparse_grad_memory_grows_with_touched_rows_not_n():
    small, entry_bytes, _ = _sparse_backward_peak(32, "cpu")       # N = 1,024 slots
    large, _, dense_bytes = _sparse_backward_peak(1024, "cpu")     # N = 1,048,576 slots (128 MiB dense)
    # The same 1,024 entries read either memory: the backward's extra memory is the touched rows
    # (at most one row per entry) plus bookkeeping, whatever N is; a dense gradient would be 128 MiB.
    assert large <= 4 * entry_bytes + (1 << 20), (large, entry_bytes)
    assert large <= dense_bytes / 32, (large, dense_bytes)
    assert large <= 2 * small + (1 << 20), (small, large)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_product_key_exact_ties_match_reference(backend, device, dtype):
    skip_unless_served(backend, dtype)
    # Integer-valued data: every score is exact and ties abound, in the halves and the candidates.
    g = torch.Generator().manual_seed(3)
    B, H, T, Dk, n_sub = 2, 2, 11, 8, 9
    q = torch.randint(-2, 3, (B, H, T, Dk), generator=g).to(dtype)
    subkeys = torch.randint(-1, 2, (H, 2, n_sub, Dk // 2), generator=g).to(dtype)
    values = torch.randn(n_sub * n_sub, 5, generator=g).to(dtype)
    for k, k_sub, scale in ((1, 1, 1.0), (4, 3, 1.0), (9, 9, 0.5), (20, 5, 0.25), (81, 9, 1.0)):
        for sum_heads in (False, True):
            read = l2m.product_key_read(q.to(device), subkeys.to(device), values.to(device), k, k_sub=k_sub,
                                        scale=scale, sum_heads=sum_heads, backend=backend)
            want = product_key_read_ref(q, subkeys, values, k, k_sub=k_sub, scale=scale, sum_heads=sum_heads)
            assert torch.equal(read.indices.cpu(), want[1]), f"k={k} k_sub={k_sub}"
            assert_close("out", read.out, want[0], dtype)
            assert_close("weights", read.weights, want[2], dtype)
            assert_close("lse", read.lse, want[3], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("data", ["random", "twins", "integer"])
def test_product_key_cpu_selection_paths_match_reference(dtype, data):
    """The cpu forward's selections at sizes that take each path: halves with n_sub >= 4 k_sub (the
    bar from 2 k_sub group maxima) and below, a few hundred collected scores or more (placement by
    rank, or the sort), the staircase of combined pairs decided or not. Random data has no equal
    scores; "twins" repeats every fourth sub-key once (pairs of equal scores in a half, and of equal
    sums among the combined pairs); integer-valued data ties everywhere."""
    skip_unless_served("cpu", dtype)
    g = torch.Generator().manual_seed(5)
    for n_sub, k, k_sub, Dk in ((64, 32, 16, 16), (130, 32, 32, 8), (300, 32, 32, 16), (512, 128, 128, 8),
                               (40, 200, 40, 8)):
        q = torch.randn(1, 2, 19, Dk, generator=g)
        subkeys = torch.randn(2, 2, n_sub, Dk // 2, generator=g)
        if data == "twins":
            subkeys[:, :, 1::4] = subkeys[:, :, 0::4][:, :, :subkeys[:, :, 1::4].shape[2]]
        if data == "integer":
            q, subkeys = q.round().clamp(-1, 1), subkeys.round().clamp(-1, 1)
        q, subkeys = q.to(dtype), subkeys.to(dtype)
        values = torch.randn(n_sub * n_sub, 3, generator=g).to(dtype)
        read = l2m.product_key_read(q, subkeys, values, k, k_sub=k_sub, backend="cpu")
        want = product_key_read_ref(q, subkeys, values, k, k_sub=k_sub)
        assert torch.equal(read.indices, want[1]), f"n_sub={n_sub} k={k} k_sub={k_sub}"
        assert_close("weights", read.weights, want[2], dtype)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("sum_heads", [False, True])
def test_product_key_nan_rows(backend, device, sum_heads):
    case = (2, 3, 6, 8, 9, 4, 5, 3, sum_heads)
    q, subkeys, values = _inputs(case, torch.float32, device, requires_grad=False)
    q[0, 1, 3, 2] = float("nan")   # first half
    q[1, 2, 0, 7] = float("nan")   # second half
    read = l2m.product_key_read(q, subkeys, values, 5, k_sub=3, sum_heads=sum_heads, backend=backend)
    want = product_key_read_ref(q.cpu(), subkeys.cpu(), values.cpu(), 5, k_sub=3, sum_heads=sum_heads)
    assert torch.equal(read.indices.cpu(), want[1]), "NaN rows select as torch.sort ranks NaN"
    bad = torch.zeros(2, 3, 6, dtype=torch.bool, device=device)
    bad[0, 1, 3] = bad[1, 2, 0] = True
    assert torch.isnan(read.lse[bad]).all() and torch.isnan(read.weights[bad]).all()
    assert torch.isfinite(read.lse[~bad]).all() and torch.isfinite(read.weights[~bad]).all()
    out_bad = bad.any(1) if sum_heads else bad
    assert torch.isnan(read.out[out_bad]).all()
    assert torch.isfinite(read.out[~out_bad]).all()


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("sum_heads", [False, True])
def test_product_key_empty_and_noncontiguous(backend, device, sum_heads):
    H, Dk, n_sub, Dv, k = 2, 8, 9, 4, 5
    subkeys = rand(H, 2, n_sub, Dk // 2, device=device, requires_grad=True)
    values = rand(n_sub * n_sub, Dv, device=device, requires_grad=True)
    for B, T in ((0, 6), (2, 0)):
        q = rand(B, H, T, Dk, device=device, requires_grad=True)
        read = l2m.product_key_read(q, subkeys, values, k, sum_heads=sum_heads, backend=backend)
        assert read.out.shape == ((B, T, Dv) if sum_heads else (B, H, T, Dv))
        assert read.indices.shape == (B, H, T, k) and read.lse.shape == (B, H, T)
        dq, dsubkeys, dvalues = torch.autograd.grad(read.out.sum() + read.lse.sum(), (q, subkeys, values),
                                                    allow_unused=True)
        assert dq.shape == q.shape
        assert torch.equal(dsubkeys, torch.zeros_like(subkeys))
        assert torch.equal(dvalues, torch.zeros_like(values))

    q = rand(2, H, 7, Dk, device=device)
    read = l2m.product_key_read(q, subkeys, values, k, sum_heads=sum_heads, backend=backend)
    qt = q.transpose(2, 3).contiguous().transpose(2, 3)  # same values, non-contiguous
    st = subkeys.detach().transpose(2, 3).contiguous().transpose(2, 3)
    vt = values.detach().t().contiguous().t()
    assert not (qt.is_contiguous() or st.is_contiguous() or vt.is_contiguous())
    nc = l2m.product_key_read(qt, st, vt, k, sum_heads=sum_heads, backend=backend)
    for a, b in zip(nc, read):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("sparse_grad", [False, True])
def test_product_key_deterministic_gradients(backend, device, sparse_grad):
    # Many queries hit the same sub-keys and slots. Under the Triton interpreter (one thread, no
    # atomics racing) fewer queries and two runs exercise the same deterministic code path.
    interpreted = backend == "triton" and device == "cpu"
    case = (2, 3, 12 if interpreted else 40, 16, 6, 8, 16, 5, True)
    q, subkeys, values = _inputs(case, torch.float32, device)
    runs = []
    threads = torch.get_num_threads()
    try:
        for num_threads in (threads, 1) if interpreted else (threads, threads, 1):
            torch.set_num_threads(num_threads)
            read = l2m.product_key_read(q, subkeys, values, 16, k_sub=5, sum_heads=True, sparse_grad=sparse_grad,
                                        deterministic=True, backend=backend)
            grads = torch.autograd.grad(read.out.sum() + read.lse.sum() + read.weights[..., 0].sum(),
                                        (q, subkeys, values))
            runs.append([g.to_dense() if g.is_sparse else g for g in grads])
    finally:
        torch.set_num_threads(threads)
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            assert torch.equal(a, b)


def test_cpu_kernels_reject_bad_arguments():
    if "cpu" not in l2m.available_backends("cpu"):
        pytest.skip("cpu backend unavailable")
    ext = importlib.import_module("l2m_kernels._C")
    B, H, T, Dk, n_sub, Dv, k = 1, 2, 3, 4, 3, 2, 2
    q, subkeys, values = torch.randn(B, H, T, Dk), torch.randn(H, 2, n_sub, Dk // 2), torch.randn(n_sub ** 2, Dv)

    def outs(k=k, sum_heads=False):
        return (torch.empty((B, T, Dv) if sum_heads else (B, H, T, Dv)),
                torch.empty(B, H, T, k, dtype=torch.int64), torch.empty(B, H, T, k), torch.empty(B, H, T))

    with pytest.raises(ValueError, match="k must be"):
        ext.product_key_fwd(q, subkeys, values, 5, 2, 1.0, False, *outs(5))
    with pytest.raises(ValueError, match="k_sub"):
        ext.product_key_fwd(q, subkeys, values, k, 4, 1.0, False, *outs())
    with pytest.raises(ValueError, match="out"):
        ext.product_key_fwd(q, subkeys, values, k, 2, 1.0, True, *outs())
    with pytest.raises(ValueError, match="values"):
        ext.product_key_fwd(q, subkeys, torch.randn(n_sub ** 2 + 1, Dv), k, 2, 1.0, False, *outs())
    with pytest.raises(TypeError, match="subkeys"):
        ext.product_key_fwd(q, subkeys.double(), values, k, 2, 1.0, False, *outs())
    out, indices, weights, lse = outs()
    ext.product_key_fwd(q, subkeys, values, k, 2, 1.0, False, out, indices, weights, lse)
    grads = (torch.empty_like(q), torch.empty_like(subkeys), torch.empty_like(values))
    cots = (torch.randn(B, H, T, Dv), torch.randn(B, H, T, k), torch.randn(B, H, T))
    order = torch.sort(indices.reshape(-1), stable=True).indices
    for bad_slot in (-1, n_sub ** 2):
        bad = indices.clone()
        bad[0, 1, 2, 1] = bad_slot
        with pytest.raises(IndexError, match="indices"):
            ext.product_key_bwd(*cots, q, subkeys, values, bad, weights, 1.0, False, False, order, *grads)
    with pytest.raises(ValueError, match="dvalues"):
        ext.product_key_bwd(*cots, q, subkeys, values, indices, weights, 1.0, False, True, order, *grads)
    # entry_order: each entry once, by slot, a slot's entries in increasing order (a stable sort).
    twice = indices.clone()
    twice[0, 0, 0, 1] = twice[0, 0, 0, 0]  # two entries of one slot
    twice_order = torch.sort(twice.reshape(-1), stable=True).indices
    position = int((twice_order == 0).nonzero())
    unstable = twice_order.clone()
    unstable[position], unstable[position + 1] = twice_order[position + 1], twice_order[position]
    out_of_range = twice_order.clone()
    out_of_range[-1] = order.numel()
    for entry_order, error, match in ((twice_order.flip(0), ValueError, "sorted by indices"),
                                      (unstable, ValueError, "increasing order"),
                                      (out_of_range, IndexError, "entry_order must be in"),
                                      (twice_order[:-1], ValueError, "entry_order")):
        with pytest.raises(error, match=match):
            ext.product_key_bwd(*cots, q, subkeys, values, twice, weights, 1.0, False, False, entry_order,
                                *grads)
    ext.product_key_bwd(*cots, q, subkeys, values, twice, weights, 1.0, False, False, twice_order, *grads)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_product_key_infinite_score_lse(backend, device):
    # A +inf candidate score: weights and out are NaN (inf - inf) but lse = logsumexp is +inf, as
    # in the reference; a NaN candidate makes lse NaN. The triton kernels rank NaN like +inf and
    # returned NaN for both (found by the fuzzer).
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 1, 3, 4, generator=g)
    subkeys = torch.randn(1, 2, 3, 2, generator=g).abs()
    values = torch.randn(9, 3, generator=g)
    q[0, 0, 0, 1] = float("inf")    # row 0: s1 = +inf for every first-half entry
    q[0, 0, 1, 2] = float("nan")    # row 1: NaN
    for k in (1, 4):
        read = l2m.product_key_read(q.to(device), subkeys.to(device), values.to(device), k, k_sub=3,
                                    backend=backend)
        want = product_key_read_ref(q, subkeys, values, k, k_sub=3)
        lse = read.lse.cpu()[0, 0]
        assert lse[0] == float("inf") and torch.isnan(lse[1]) and torch.isfinite(lse[2]), f"k={k}: {lse}"
        assert_close("lse", read.lse, want[3])


# ---- the GPU backends' plans (product_key/plan.py), on the CPU against brute-force Python ----

def _brute_force_segments(contributions, num_rows):
    """(entry_coef, entry_src, run_starts) as lists from (row, coef, src) triples in entry order."""
    runs = {}
    for row, coef, src in contributions:
        runs.setdefault(row, []).append((coef, src))
    coefs, srcs, starts = [], [], []
    for row in range(num_rows):
        starts.append(len(coefs))
        coefs += [c for c, _ in runs.get(row, [])]
        srcs += [s for _, s in runs.get(row, [])]
    starts.append(len(coefs))
    return coefs, srcs, starts


def _check_segments(segments, expected):
    coefs, srcs, starts = expected
    assert segments.run_starts.tolist() == starts
    assert segments.entry_coef[:len(coefs)].tolist() == coefs
    assert segments.entry_src[:len(srcs)].tolist() == srcs


@pytest.mark.parametrize("sum_heads", [False, True])
@pytest.mark.parametrize("B,H,T,n_sub,k", [(1, 1, 1, 1, 1), (2, 3, 4, 3, 5), (1, 2, 6, 5, 25)])
def test_segments_match_brute_force(B, H, T, n_sub, k, sum_heads):
    """Each entry's contributions grouped by the gradient row they add to, in entry order; entries
    outside [0, n_sub ** 2) in no run."""
    from l2m_kernels.ops.product_key.plan import subkey_segments, value_segments
    N = n_sub * n_sub
    g = torch.Generator().manual_seed(B * 100 + T * 10 + k)
    indices = torch.randint(-1, N + 1, (B, H, T, k), generator=g)
    subkey_rows, value_rows = [], []
    for b in range(B):
        for h in range(H):
            for t in range(T):
                row = (b * H + h) * T + t
                for m in range(k):
                    slot = int(indices[b, h, t, m])
                    if not 0 <= slot < N:
                        continue
                    for half, sub in ((0, slot // n_sub), (1, slot % n_sub)):
                        subkey_rows.append(((h * 2 + half) * n_sub + sub, row * k + m, row * 2 + half))
                    value_rows.append((slot, row * k + m, b * T + t if sum_heads else row))
    _check_segments(subkey_segments(indices, n_sub), _brute_force_segments(subkey_rows, H * 2 * n_sub))
    _check_segments(value_segments(indices, N, sum_heads), _brute_force_segments(value_rows, N))
