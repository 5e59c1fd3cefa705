"""Smoke test of the CPU top-k memory read kernels ``l2m_kernels._C.topk_read_fwd/bwd``, called
directly (no Python dispatch layer), against ``topk_memory_read_ref``.

Shapes are small and odd (T = 7, N = 63/129/300, D = 7/63), with k = 1, k = N and k = 256, grouped
heads (Hm = H, H/2, 1), shared 3-D memories, valid_len (0, < k, = N), empty batches, and every
dtype. Outputs are pre-filled with NaN (indices with a sentinel) so an element the kernel forgets
to write fails the comparison.

Selection on random data: the fused scores are float32 dot products summed in another order than
the reference's matmul, so two slots whose scores differ by an ulp may swap. The indices must be a
valid top-k of the float64 scores in descending order up to that rounding
(``l2m_kernels.testing.assert_valid_topk``), on data where most of the order is separated by more
than 1e-4 (so that the check decides most positions exactly). out/weights/lse
are then compared with the float64 reference gather at the fused indices. Exact ties (integer
data, duplicated key rows) and NaN rows are compared exactly everywhere. Gradients: against
torch.autograd.grad of the float64 reference gather, with random cotangents for out, weights and
lse; bitwise determinism across runs and across 1 vs 2 threads.
"""
from __future__ import annotations

import importlib
import math

import pytest
import torch

try:
    cpu_ext = importlib.import_module("l2m_kernels._C")
except ImportError:
    pytest.skip("CPU extension not built: run pip install --no-build-isolation -e .",
                allow_module_level=True)
if not hasattr(cpu_ext, "topk_read_fwd"):
    pytest.skip("CPU extension predates topk_read_fwd: rebuild with "
                "pip install --no-build-isolation -e .", allow_module_level=True)

from l2m_kernels.ops.topk_read.reference import (  # noqa: E402
    full_scores, topk_memory_read_ref, topk_read_gather)
from l2m_kernels.testing import assert_close, assert_valid_topk, read_scores  # noqa: E402

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
INDEX_SENTINEL = -7
SEPARATION = 1e-4  # score gap (scores are O(1)) beyond which summation order cannot swap slots


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def randn(*shape, dtype, generator, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float64, generator=generator) * scale).to(dtype)


def run_fwd(q, keys, values, k, scale, valid_len=None):
    B, H, T, _ = q.shape
    acc = acc_dtype(q.dtype)
    out = torch.full((B, H, T, values.shape[-1]), math.nan, dtype=q.dtype)
    indices = torch.full((B, H, T, k), INDEX_SENTINEL, dtype=torch.int64)
    weights = torch.full((B, H, T, k), math.nan, dtype=acc)
    lse = torch.full((B, H, T), math.nan, dtype=acc)
    cpu_ext.topk_read_fwd(q, keys, values, valid_len, k, scale, out, indices, weights, lse)
    return out, indices, weights, lse


def run_bwd(dout, dweights, dlse, q, keys, values, indices, weights, scale):
    dq, dkeys, dvalues = (torch.full_like(t, math.nan) for t in (q, keys, values))
    cpu_ext.topk_read_bwd(dout, dweights, dlse, q, keys, values, indices, weights, scale,
                          dq, dkeys, dvalues)
    return dq, dkeys, dvalues


def masked_scores(q, keys, scale, valid_len):
    """(B, H, T, N) float64 scores, -inf at non-existent slots, NaN ranked like +inf."""
    scores = full_scores(q.double(), keys.double(), scale)
    if valid_len is not None:
        slot_ids = torch.arange(scores.shape[-1])
        scores = scores.masked_fill(slot_ids >= valid_len.reshape(-1, 1, 1, 1), -math.inf)
    return scores


def check_selection(indices, q, keys, scale, valid_len, min_separated=0.5):
    """A valid top-k (assert_valid_topk), on data whose order is mostly unambiguous: position j
    counts when its score is more than SEPARATION away from the scores ranked j - 1 and j + 1 (the
    latter may be the first one left out)."""
    k = indices.shape[-1]
    N = keys.shape[-2]
    assert_valid_topk(indices, read_scores(q, keys, scale), valid_len=valid_len,
                      score_dtype=acc_dtype(q.dtype))
    scores = masked_scores(q, keys, scale, valid_len)
    top = torch.sort(scores, dim=-1, descending=True).values[..., :min(k + 1, N)]
    gaps = (top[..., :-1] - top[..., 1:]).nan_to_num(nan=math.inf)
    gaps = torch.where(torch.isinf(top[..., :-1]) & (top[..., :-1] == top[..., 1:]), 0.0, gaps)
    if top.shape[-1] == k:  # k == N: nothing is left out
        gaps = torch.cat([gaps, torch.full_like(gaps[..., :1], math.inf)], dim=-1)
    gap_after = gaps[..., :k]
    gap_before = torch.cat([torch.full_like(gaps[..., :1], math.inf), gaps[..., :k - 1]], dim=-1)
    separated = (gap_before > SEPARATION) & (gap_after > SEPARATION)
    if indices.numel():
        assert separated.float().mean() >= min_separated, "test data too tied to be meaningful"


def check_values(result, q, keys, values, scale, dtype):
    """out, weights, lse against the float64 reference gather at the fused indices."""
    out, indices, weights, lse = result
    ref_out, ref_weights, ref_lse = topk_read_gather(q.double(), keys.double(), values.double(),
                                                     indices, scale)
    assert_close("out", out, ref_out, dtype=dtype)
    assert_close("weights", weights, ref_weights, dtype=dtype)
    assert_close("lse", lse, ref_lse, dtype=dtype)
    missing = indices < 0
    assert (weights[missing] == 0).all()


# (id, B, H, Hm, T, N, Dk, Dv, k, shared, valid_len)
CASES = [
    ("odd-63", 2, 1, 1, 7, 63, 7, 7, 5, False, None),
    ("odd-129", 1, 2, 2, 7, 129, 63, 63, 8, False, None),
    ("k1", 2, 2, 1, 9, 63, 7, 5, 1, False, None),  # 18 rows per memory: 2-vector blocks
    ("k=N", 1, 1, 1, 7, 63, 7, 7, 63, False, None),
    ("k256", 1, 2, 2, 5, 300, 16, 8, 256, False, None),
    ("grouped-Hm2", 2, 4, 2, 7, 129, 7, 63, 4, False, None),
    ("grouped-Hm1", 2, 4, 1, 7, 129, 63, 7, 4, False, None),
    ("shared", 3, 4, 2, 7, 63, 7, 7, 4, True, None),
    ("valid_len", 4, 2, 2, 7, 63, 7, 7, 8, False, [0, 3, 20, 63]),
    ("valid_len-shared", 4, 2, 1, 7, 63, 7, 5, 8, True, [63, 0, 5, 30]),
    ("many-units", 1, 2, 1, 300, 129, 7, 7, 4, False, None),  # 600 rows: several work units
    ("decode", 2, 3, 3, 1, 129, 7, 7, 4, True, [129, 70]),
]
CASE_IDS = [case[0] for case in CASES]


def case_inputs(case, dtype, seed=0):
    _, B, H, Hm, T, N, Dk, Dv, k, shared, valid_len = case
    gen = torch.Generator().manual_seed(seed)
    lead = (Hm, N) if shared else (B, Hm, N)
    q = randn(B, H, T, Dk, dtype=dtype, generator=gen)
    keys = randn(*lead, Dk, dtype=dtype, generator=gen)
    values = randn(*lead, Dv, dtype=dtype, generator=gen)
    valid = None if valid_len is None else torch.tensor(valid_len, dtype=torch.int64)
    return q, keys, values, k, Dk ** -0.5, valid


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_fwd_matches_reference(case, dtype):
    q, keys, values, k, scale, valid_len = case_inputs(case, dtype)
    result = run_fwd(q, keys, values, k, scale, valid_len)
    check_selection(result[1], q, keys, scale, valid_len)
    check_values(result, q, keys, values, scale, dtype)
    if valid_len is not None:
        for b, length in enumerate(valid_len.tolist()):
            live = min(length, k)
            assert (result[1][b, ..., live:] == -1).all() and (result[1][b, ..., :live] >= 0).all()
            if length == 0:
                assert (result[3][b] == -math.inf).all() and (result[0][b] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_bwd_matches_reference_grad(case, dtype):
    q, keys, values, k, scale, valid_len = case_inputs(case, dtype)
    out, indices, weights, lse = run_fwd(q, keys, values, k, scale, valid_len)
    gen = torch.Generator().manual_seed(1)
    acc = acc_dtype(dtype)
    dout = randn(*out.shape, dtype=dtype, generator=gen)
    dweights = randn(*weights.shape, dtype=acc, generator=gen)
    dlse = randn(*lse.shape, dtype=acc, generator=gen)
    grads = run_bwd(dout, dweights, dlse, q, keys, values, indices, weights, scale)

    leaves = [t.double().requires_grad_() for t in (q, keys, values)]
    ref = topk_read_gather(*leaves, indices, scale)
    ref_grads = torch.autograd.grad(ref, leaves, (dout.double(), dweights.double(),
                                                  dlse.double()))
    for name, actual, expected in zip(("dq", "dkeys", "dvalues"), grads, ref_grads):
        assert_close(name, actual, expected, dtype=dtype)
    if valid_len is not None:
        # Slots nobody can select get exactly zero gradient; so do rows with nothing selected.
        for b, length in enumerate(valid_len.tolist()):
            if length == 0:
                assert (grads[0][b] == 0).all()
            if keys.dim() == 4:
                assert (grads[1][b, :, length:] == 0).all() and (grads[2][b, :, length:] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", [5, 16])
def test_exact_ties_follow_the_smaller_slot(k, dtype):
    # Small integers and a power-of-two scale: every score is exact, and duplicated key rows tie.
    gen = torch.Generator().manual_seed(2)
    B, H, Hm, T, N, Dk, Dv = 2, 2, 1, 7, 129, 7, 5
    q = torch.randint(-3, 4, (B, H, T, Dk), generator=gen).to(dtype)
    keys = torch.randint(-2, 3, (B, Hm, N, Dk), generator=gen).to(dtype)
    keys[:, :, 64:128] = keys[:, :, :64].clone()  # slot n + 64 ties with slot n
    keys[:, :, 128] = keys[:, :, 5]
    values = torch.randint(-4, 5, (B, Hm, N, Dv), generator=gen).to(dtype)
    valid_len = torch.tensor([N, 100])
    scale = 0.5
    result = run_fwd(q, keys, values, k, scale, valid_len)
    ref = topk_memory_read_ref(q, keys, values, k, scale, valid_len)
    assert torch.equal(result[1], ref[1])
    check_values(result, q, keys, values, scale, dtype)
    # The data does exercise ties across the k-th position.
    top = torch.sort(masked_scores(q, keys, scale, valid_len), dim=-1, descending=True).values
    assert (top[..., k - 1] == top[..., k]).any()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_rows_are_isolated(dtype):
    gen = torch.Generator().manual_seed(3)
    B, H, Hm, T, N, Dk, Dv, k = 2, 2, 1, 7, 63, 7, 5, 4
    q = randn(B, H, T, Dk, dtype=dtype, generator=gen)
    keys = randn(B, Hm, N, Dk, dtype=dtype, generator=gen)
    values = randn(B, Hm, N, Dv, dtype=dtype, generator=gen)
    q[0, 1, 3, :] = math.nan  # a whole NaN query row
    q[0, 0, 2, 4] = math.nan  # one NaN element
    keys[1, 0, 10, 3] = math.nan  # a NaN key row: selected first by every query of batch 1
    values[0, 0, 20, 0] = math.nan  # a NaN value: only rows that select slot 20 see it
    scale = Dk ** -0.5
    out, indices, weights, lse = run_fwd(q, keys, values, k, scale)
    ref = topk_memory_read_ref(q, keys, values, k, scale)

    nan_rows = torch.zeros(B, H, T, dtype=torch.bool)
    nan_rows[0, 1, 3] = nan_rows[0, 0, 2] = True
    nan_rows[1] = True
    assert torch.equal(indices[nan_rows], ref[1][nan_rows])
    assert torch.equal(indices[0, 1, 3], torch.arange(k))  # NaN ranks like +inf: first k slots
    assert (indices[1, ..., 0] == 10).all()
    assert torch.isnan(lse[nan_rows]).all() and torch.isnan(out[nan_rows]).all()
    assert torch.isnan(weights[nan_rows]).all()

    clean = ~nan_rows
    assert torch.equal(indices[clean], ref[1][clean])
    reads_nan_value = (indices == 20).any(dim=-1) & clean
    finite = clean & ~reads_nan_value
    assert torch.isfinite(out[finite]).all() and torch.isfinite(lse[clean]).all()
    assert torch.isfinite(weights[clean]).all()
    ref_out, ref_weights, ref_lse = topk_read_gather(q.double(), keys.double(), values.double(),
                                                     indices, scale)
    assert_close("out", out[finite], ref_out[finite], dtype=dtype)
    assert_close("weights", weights[clean], ref_weights[clean], dtype=dtype)
    assert_close("lse", lse[clean], ref_lse[clean], dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_minus_inf_scores_keep_their_slot_with_weight_zero(dtype):
    # Positive queries against a huge negative key row: that slot's score overflows to -inf.
    gen = torch.Generator().manual_seed(4)
    B, H, T, N, Dk, Dv = 2, 1, 5, 9, 4, 3
    huge = torch.finfo(dtype).max
    q = (torch.rand(B, H, T, Dk, generator=gen, dtype=torch.float64) + 0.5).to(dtype)
    keys = randn(B, 1, N, Dk, dtype=dtype, generator=gen)
    keys[:, :, 0] = -huge
    values = randn(B, 1, N, Dv, dtype=dtype, generator=gen)
    valid_len = torch.tensor([6, 1])  # batch 1: the -inf slot is the only one
    k = 8
    out, indices, weights, lse = run_fwd(q, keys, values, k, 1.0, valid_len)
    ref = topk_memory_read_ref(q, keys, values, k, 1.0, valid_len)
    assert torch.equal(indices, ref[1])
    assert (indices[0, ..., 5] == 0).all() and (indices[0, ..., 6:] == -1).all()
    assert (weights[0, ..., 5:] == 0).all() and torch.isfinite(lse[0]).all()
    assert (indices[1, ..., 0] == 0).all() and (weights[1] == 0).all()
    assert (lse[1] == -math.inf).all() and (out[1] == 0).all()
    assert_close("out", out, ref[0], dtype=dtype)
    assert_close("weights", weights, ref[2], dtype=dtype)
    assert_close("lse", lse, ref[3], dtype=dtype)


def test_out_of_range_valid_len_is_clamped():
    # The Python layer rejects these; the kernel must still stay in bounds (clamp to [0, N]).
    q, keys, values, k, scale, _ = case_inputs(CASES[0], torch.float32)
    N = keys.shape[-2]
    clamped = run_fwd(q, keys, values, k, scale, torch.tensor([0, N]))
    wild = run_fwd(q, keys, values, k, scale, torch.tensor([-5, N + 1000]))
    for a, b in zip(clamped, wild):
        assert torch.equal(a, b)


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("B, T", [(0, 5), (2, 0)])
def test_empty_batches(B, T, shared):
    H, Hm, N, Dk, Dv, k = 2, 1, 9, 4, 3, 3
    lead = (Hm, N) if shared else (B, Hm, N)
    q = torch.randn(B, H, T, Dk)
    keys, values = torch.randn(*lead, Dk), torch.randn(*lead, Dv)
    out, indices, weights, lse = run_fwd(q, keys, values, k, 0.5)
    assert out.shape == (B, H, T, Dv) and indices.shape == (B, H, T, k)
    dq, dkeys, dvalues = run_bwd(torch.randn(B, H, T, Dv), torch.randn(B, H, T, k),
                                 torch.randn(B, H, T), q, keys, values, indices, weights, 0.5)
    # Nothing was read: every memory gradient is written, as zero.
    assert (dkeys == 0).all() and (dvalues == 0).all() and dq.numel() == 0


def fwd_bwd_once(inputs, k, scale, valid_len, seed=5):
    q, keys, values = inputs
    result = run_fwd(q, keys, values, k, scale, valid_len)
    gen = torch.Generator().manual_seed(seed)
    dout = randn(*result[0].shape, dtype=q.dtype, generator=gen)
    dweights = randn(*result[2].shape, dtype=result[2].dtype, generator=gen)
    dlse = randn(*result[3].shape, dtype=result[3].dtype, generator=gen)
    grads = run_bwd(dout, dweights, dlse, q, keys, values, result[1], result[2], scale)
    return result + grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shared", [False, True])
def test_bitwise_deterministic_across_runs_and_thread_counts(shared, dtype):
    gen = torch.Generator().manual_seed(6)
    B, H, Hm, T, N, Dk, Dv, k = 2, 4, 2, 150, 700, 24, 20, 12
    lead = (Hm, N) if shared else (B, Hm, N)
    inputs = (randn(B, H, T, Dk, dtype=dtype, generator=gen),
              randn(*lead, Dk, dtype=dtype, generator=gen),
              randn(*lead, Dv, dtype=dtype, generator=gen))
    valid_len = torch.tensor([N, 333])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        first = fwd_bwd_once(inputs, k, 0.2, valid_len)
        second = fwd_bwd_once(inputs, k, 0.2, valid_len)
        torch.set_num_threads(1)
        single = fwd_bwd_once(inputs, k, 0.2, valid_len)
    finally:
        torch.set_num_threads(threads)
    names = ("out", "indices", "weights", "lse", "dq", "dkeys", "dvalues")
    for name, a, b, c in zip(names, first, second, single):
        assert torch.equal(a, b), f"{name} differs between two runs"
        assert torch.equal(a, c), f"{name} differs between 2 threads and 1 thread"


def test_bad_arguments_raise_instead_of_reading_out_of_bounds():
    B, H, T, N, Dk, Dv, k = 2, 2, 3, 9, 4, 3, 3
    q, keys, values = torch.randn(B, H, T, Dk), torch.randn(B, 1, N, Dk), torch.randn(B, 1, N, Dv)

    def outputs(k=k):
        return (torch.empty(B, H, T, Dv), torch.empty(B, H, T, k, dtype=torch.int64),
                torch.empty(B, H, T, k), torch.empty(B, H, T))

    fwd = cpu_ext.topk_read_fwd
    with pytest.raises(ValueError, match="k must be"):
        fwd(q, keys, values, None, 0, 1.0, *outputs(0))
    with pytest.raises(ValueError, match="k must be"):
        fwd(q, keys, values, None, N + 1, 1.0, *outputs(N + 1))
    with pytest.raises(ValueError, match="out"):
        fwd(q, keys, values, None, k, 1.0, torch.empty(B, H, T, Dv + 1), *outputs()[1:])
    with pytest.raises(TypeError, match="weights"):
        o = outputs()
        fwd(q, keys, values, None, k, 1.0, o[0], o[1], o[2].double(), o[3])
    with pytest.raises(ValueError, match="keys"):
        fwd(q, torch.randn(B, 1, N, Dk + 1), values, None, k, 1.0, *outputs())
    with pytest.raises(ValueError, match="Hm"):
        fwd(q, torch.randn(B, 3, N, Dk), torch.randn(B, 3, N, Dv), None, k, 1.0, *outputs())
    with pytest.raises(ValueError, match="values"):
        fwd(q, keys, torch.randn(B, 1, N + 1, Dv), None, k, 1.0, *outputs())
    with pytest.raises(ValueError, match="valid_len"):
        fwd(q, keys, values, torch.tensor([1, 2, 3]), k, 1.0, *outputs())
    with pytest.raises(TypeError, match="valid_len"):
        fwd(q, keys, values, torch.tensor([1, 2], dtype=torch.int32), k, 1.0, *outputs())
    with pytest.raises(TypeError):
        fwd(q.int(), keys.int(), values.int(), None, k, 1.0, *outputs())
    with pytest.raises(ValueError, match="q must have a contiguous last dimension"):
        fwd(q.transpose(2, 3).contiguous().transpose(2, 3), keys, values, None, k, 1.0, *outputs())
    with pytest.raises(ValueError, match="keys must be contiguous"):  # q's rows may be strided, keys not
        fwd(q.transpose(1, 2).contiguous().transpose(1, 2), torch.randn(B, 1, N + 2, Dk)[:, :, 1:N + 1],
            values, None, k, 1.0, *outputs())
    with pytest.raises(RuntimeError):  # an output overlapping an input
        o = outputs()
        fwd(q, keys, values, None, k, 1.0, o[0], o[1], o[2], q.view(-1)[:B * H * T].view(B, H, T))

    out, indices, weights, lse = outputs()
    fwd(q, keys, values, None, k, 1.0, out, indices, weights, lse)
    grads = (torch.empty_like(q), torch.empty_like(keys), torch.empty_like(values))
    cotangents = (torch.randn(B, H, T, Dv), torch.randn(B, H, T, k), torch.randn(B, H, T))
    bad = indices.clone()
    bad[1, 0, 2, 1] = N
    with pytest.raises(IndexError, match="indices"):
        cpu_ext.topk_read_bwd(*cotangents, q, keys, values, bad, weights, 1.0, *grads)
    bad[1, 0, 2, 1] = -2
    with pytest.raises(IndexError, match="indices"):
        cpu_ext.topk_read_bwd(*cotangents, q, keys, values, bad, weights, 1.0, *grads)
    with pytest.raises(ValueError, match="dkeys"):
        cpu_ext.topk_read_bwd(*cotangents, q, keys, values, indices, weights, 1.0, grads[0],
                              torch.empty(B, 1, N + 1, Dk), grads[2])
    with pytest.raises(ValueError, match="dweights"):
        cpu_ext.topk_read_bwd(cotangents[0], torch.randn(B, H, T, k + 1), cotangents[2], q, keys,
                              values, indices, weights, 1.0, *grads)
