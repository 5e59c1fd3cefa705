"""The reference top-k memory read against brute-force Python loops (SPEC section 1)."""
from __future__ import annotations

import math

import pytest
import torch

from l2m_kernels.ops.topk_read.reference import (
    topk_memory_read_ref,
    topk_read_gather,
    topk_read_select,
)
from l2m_kernels.testing import assert_close

NEG_INF = float("-inf")


def _memory_row(memory, b, hm):
    return memory[hm] if memory.dim() == 3 else memory[b, hm]


def brute_topk_read(q, keys, values, k, scale=None, valid_len=None):
    """Slot-by-slot scores in float64 Python floats, sorted by the explicit key (-score, slot)."""
    q, keys, values = (x.detach().double() for x in (q, keys, values))
    batch, heads, seq_len, dim_k = q.shape
    mem_heads, num_slots, dim_v = keys.shape[-3], keys.shape[-2], values.shape[-1]
    group = heads // mem_heads
    scale = dim_k ** -0.5 if scale is None else scale
    out = torch.zeros(batch, heads, seq_len, dim_v, dtype=torch.float64)
    indices = torch.full((batch, heads, seq_len, k), -1, dtype=torch.int64)
    weights = torch.zeros(batch, heads, seq_len, k, dtype=torch.float64)
    lse = torch.full((batch, heads, seq_len), NEG_INF, dtype=torch.float64)
    for b in range(batch):
        n_exist = num_slots if valid_len is None else int(valid_len[b])
        for h in range(heads):
            key_rows = _memory_row(keys, b, h // group).tolist()
            value_rows = _memory_row(values, b, h // group)
            for t in range(seq_len):
                q_row = q[b, h, t].tolist()
                scored = []
                for n in range(n_exist):
                    dot = 0.0
                    for d in range(dim_k):
                        dot += q_row[d] * key_rows[n][d]
                    scored.append((-(scale * dot), n))
                chosen = sorted(scored)[:k]
                if not chosen:
                    continue
                scores = [-neg for neg, _ in chosen]
                top = max(scores)
                total = sum(math.exp(s - top) for s in scores)
                for j, (s, (_, n)) in enumerate(zip(scores, chosen)):
                    indices[b, h, t, j] = n
                    weights[b, h, t, j] = math.exp(s - top) / total
                    out[b, h, t] += weights[b, h, t, j] * value_rows[n]
                lse[b, h, t] = top + math.log(total)
    return out, indices, weights, lse


def _check_against_brute(q, keys, values, k, scale=None, valid_len=None, tol=1e-12):
    out, indices, weights, lse = topk_memory_read_ref(q, keys, values, k, scale=scale,
                                                      valid_len=valid_len)
    b_out, b_indices, b_weights, b_lse = brute_topk_read(q, keys, values, k, scale, valid_len)
    assert out.dtype == q.dtype and indices.dtype == torch.int64
    assert weights.dtype == lse.dtype == (torch.float64 if q.dtype == torch.float64 else torch.float32)
    assert out.shape == b_out.shape and indices.shape == b_indices.shape
    assert weights.shape == b_weights.shape and lse.shape == b_lse.shape
    assert torch.equal(indices, b_indices), (indices, b_indices)
    assert_close("out", out, b_out, tol=tol)
    assert_close("weights", weights, b_weights, tol=tol)
    assert_close("lse", lse, b_lse, tol=tol)
    return indices


def _inputs(batch, heads, mem_heads, seq_len, num_slots, dim_k, dim_v, shared=False,
            dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lead = (mem_heads, num_slots) if shared else (batch, mem_heads, num_slots)
    q = torch.randn(batch, heads, seq_len, dim_k, generator=gen, dtype=torch.float64).to(dtype)
    keys = torch.randn(*lead, dim_k, generator=gen, dtype=torch.float64).to(dtype)
    values = torch.randn(*lead, dim_v, generator=gen, dtype=torch.float64).to(dtype)
    return q, keys, values


# (B, H, Hm, T, N, Dk, Dv, k, shared, valid_len)
RANDOM_CASES = [
    (2, 2, 2, 5, 16, 8, 6, 4, False, None),
    (2, 4, 2, 3, 16, 8, 5, 4, False, None),     # grouped heads
    (2, 4, 1, 3, 16, 8, 5, 3, False, None),     # one memory head for all
    (2, 4, 2, 3, 16, 8, 5, 4, True, None),      # shared 3-D memory
    (3, 2, 1, 3, 12, 4, 3, 5, True, [0, 3, 12]),  # shared + valid_len 0, < k, = N
    (3, 2, 2, 4, 10, 4, 4, 4, False, [0, 2, 10]),
    (1, 1, 1, 4, 9, 4, 3, 9, False, None),      # k == N
    (1, 1, 1, 4, 9, 4, 3, 9, False, [5]),       # k == N with fewer slots
    (2, 2, 2, 4, 9, 4, 3, 1, False, [1, 9]),    # k == 1
    (1, 3, 3, 7, 63, 7, 7, 7, False, None),     # odd sizes
    (2, 2, 1, 7, 63, 7, 5, 63, True, [63, 30]),  # odd sizes, k == N
]


@pytest.mark.parametrize("case", RANDOM_CASES, ids=lambda c: "B{}H{}Hm{}T{}N{}D{}/{}k{}{}{}".format(
    *c[:8], "s" if c[8] else "", "" if c[9] is None else "vl"))
def test_random_against_brute(case):
    batch, heads, mem_heads, seq_len, num_slots, dim_k, dim_v, k, shared, valid_len = case
    q, keys, values = _inputs(batch, heads, mem_heads, seq_len, num_slots, dim_k, dim_v, shared)
    if valid_len is not None:
        valid_len = torch.tensor(valid_len)
    _check_against_brute(q, keys, values, k, valid_len=valid_len)


def test_explicit_scale_and_float32():
    q, keys, values = _inputs(2, 2, 1, 4, 20, 8, 4, dtype=torch.float32, seed=3)
    _check_against_brute(q, keys, values, 6, scale=0.37, tol=1e-6)


def _tied_inputs(batch, heads, mem_heads, seq_len, num_slots, dim_k, dim_v, shared, seed):
    """Small-integer queries and keys drawn from a few distinct rows: scores are exact and tie."""
    gen = torch.Generator().manual_seed(seed)
    lead = (mem_heads,) if shared else (batch, mem_heads)
    q = torch.randint(-1, 2, (batch, heads, seq_len, dim_k), generator=gen).double()
    distinct = torch.randint(-1, 2, (*lead, 4, dim_k), generator=gen).double()
    pick = torch.randint(0, 4, (*lead, num_slots), generator=gen)
    keys = torch.gather(distinct, -2, pick.unsqueeze(-1).expand(*pick.shape, dim_k))
    values = torch.randn(*lead, num_slots, dim_v, generator=gen, dtype=torch.float64)
    return q, keys, values


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("mem_heads", [1, 2, 4])
@pytest.mark.parametrize("valid", [False, True])
def test_ties_against_brute(shared, mem_heads, valid):
    batch, heads, seq_len, num_slots, dim_k, k = 3, 4, 6, 20, 4, 5  # scale 0.5: exact
    q, keys, values = _tied_inputs(batch, heads, mem_heads, seq_len, num_slots, dim_k, 3, shared,
                                   seed=mem_heads + 10 * shared + 100 * valid)
    valid_len = torch.tensor([20, 7, 3]) if valid else None
    indices = _check_against_brute(q, keys, values, k, valid_len=valid_len)
    # The data must really exercise ties across the k-th position: some row's k-th and (k+1)-th
    # best scores are equal (so the smaller slot must win).
    full = brute_topk_read(q, keys, values, k + 1, None, valid_len)[1]
    assert torch.equal(full[..., :k], indices)
    scores = _scores_at(q, keys, full)
    straddle = (scores[..., k - 1] == scores[..., k]) & (full[..., k] >= 0)
    assert straddle.any()


def _scores_at(q, keys, indices):
    heads, mem_heads = q.shape[1], keys.shape[-3]
    key_rows = keys if keys.dim() == 4 else keys.expand(q.shape[0], *keys.shape)
    key_rows = key_rows.repeat_interleave(heads // mem_heads, dim=1)
    rows = torch.gather(key_rows.unsqueeze(2).expand(-1, -1, q.shape[2], -1, -1), 3,
                        indices.clamp_min(0).unsqueeze(-1).expand(*indices.shape, q.shape[-1]))
    return (rows * q.unsqueeze(-2)).sum(-1) * q.shape[-1] ** -0.5


def test_all_keys_equal_picks_first_slots():
    q = torch.randn(2, 2, 3, 4, dtype=torch.float64)
    keys = torch.ones(2, 2, 10, 4, dtype=torch.float64)
    values = torch.randn(2, 2, 10, 3, dtype=torch.float64)
    _, indices, weights, _ = topk_memory_read_ref(q, keys, values, 4, valid_len=torch.tensor([10, 2]))
    assert torch.equal(indices[0], torch.arange(4).expand(2, 3, 4))
    assert torch.equal(indices[1], torch.tensor([0, 1, -1, -1]).expand(2, 3, 4))
    assert torch.allclose(weights[0], torch.full_like(weights[0], 0.25))
    assert torch.equal(weights[1, ..., 2:], torch.zeros(2, 3, 2, dtype=torch.float64))


def test_ties_between_above_kth_entries():
    # Slots 5 and 1 tie above the k-th score, slots 2, 3, 7 tie at it: (1, 5), then (2, 3).
    q = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    scores = torch.tensor([0.0, 3.0, 2.0, 2.0, 1.0, 3.0, -1.0, 2.0], dtype=torch.float64)
    keys = scores.reshape(1, 1, 8, 1)
    values = torch.randn(1, 1, 8, 2, dtype=torch.float64)
    _, indices, _, _ = topk_memory_read_ref(q, keys, values, 4, scale=1.0)
    assert indices.flatten().tolist() == [1, 5, 2, 3]
    _check_against_brute(q, keys, values, 4, scale=1.0)


def test_empty_memory_rows():
    q, keys, values = _inputs(2, 2, 2, 3, 8, 4, 5)
    q.requires_grad_(True), keys.requires_grad_(True), values.requires_grad_(True)
    valid_len = torch.tensor([0, 8])
    out, indices, weights, lse = topk_memory_read_ref(q, keys, values, 3, valid_len=valid_len)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.equal(indices[0], torch.full_like(indices[0], -1))
    assert torch.equal(weights[0], torch.zeros_like(weights[0]))
    assert torch.isneginf(lse[0]).all() and torch.isfinite(lse[1]).all()
    finite_lse = torch.where(torch.isinf(lse), 0.0, lse)
    (out.sum() + weights.square().sum() + finite_lse.sum()).backward()
    for grad in (q.grad, keys.grad, values.grad):
        assert torch.isfinite(grad).all()
    assert torch.equal(q.grad[0], torch.zeros_like(q.grad[0]))
    assert torch.equal(keys.grad[0], torch.zeros_like(keys.grad[0]))
    # lse = -inf itself back-propagates zeros, not NaN.
    q2 = q.detach().clone().requires_grad_(True)
    topk_memory_read_ref(q2, keys.detach(), values.detach(), 3, valid_len=valid_len)[3][0].sum().backward()
    assert torch.equal(q2.grad, torch.zeros_like(q2.grad))


def test_garbage_in_missing_slots_is_ignored():
    q, keys, values = _inputs(2, 2, 1, 3, 8, 4, 5, shared=False)
    valid_len = torch.tensor([2, 0])
    expected = topk_memory_read_ref(q, keys, values, 4, valid_len=valid_len)
    dirty_keys, dirty_values = keys.clone(), values.clone()
    dirty_keys[0, :, 2:] = float("nan")
    dirty_values[0, :, 2:] = float("nan")
    dirty_keys[1] = float("nan")
    dirty_values[1] = float("inf")
    got = topk_memory_read_ref(q, dirty_keys, dirty_values, 4, valid_len=valid_len)
    for a, e in zip(got, expected):
        assert torch.equal(a, e)


def test_nan_query_row_is_isolated():
    q, keys, values = _inputs(2, 4, 2, 5, 16, 8, 6, shared=True)
    clean = topk_memory_read_ref(q, keys, values, 4)
    q_nan = q.clone()
    q_nan[1, 2, 3, 0] = float("nan")
    out, indices, weights, lse = topk_memory_read_ref(q_nan, keys, values, 4)
    row = (1, 2, 3)
    assert torch.isnan(out[row]).all() and torch.isnan(weights[row]).all() and torch.isnan(lse[row])
    # NaN scores rank like +inf: ties by smaller slot.
    assert indices[row].tolist() == [0, 1, 2, 3]
    others = torch.ones(q.shape[:3], dtype=torch.bool)
    others[row] = False
    for a, e in zip((out, indices, weights, lse), clean):
        assert torch.equal(a[others], e[others])


def test_nan_key_reaches_only_its_readers():
    q, keys, values = _inputs(2, 4, 2, 3, 10, 4, 3)
    keys[0, 1, 6, 2] = float("nan")
    out, indices, weights, lse = topk_memory_read_ref(q, keys, values, 3)
    readers = torch.zeros(q.shape[:3], dtype=torch.bool)
    readers[0, 2:] = True  # query heads 2, 3 read memory head 1
    assert (indices[readers][:, 0] == 6).all()
    assert torch.isnan(out[readers]).all() and torch.isnan(lse[readers]).all()
    assert torch.isfinite(out[~readers]).all() and torch.isfinite(lse[~readers]).all()


@pytest.mark.parametrize("shape", [(0, 2, 3), (2, 2, 0)], ids=["B0", "T0"])
@pytest.mark.parametrize("shared", [False, True])
def test_empty_batch(shape, shared):
    batch, heads, seq_len = shape
    q = torch.randn(batch, heads, seq_len, 4, dtype=torch.float32, requires_grad=True)
    lead = (1, 6) if shared else (batch, 1, 6)
    keys = torch.randn(*lead, 4, requires_grad=True)
    values = torch.randn(*lead, 5, requires_grad=True)
    valid_len = torch.zeros(batch, dtype=torch.int32) + 3
    out, indices, weights, lse = topk_memory_read_ref(q, keys, values, 2, valid_len=valid_len)
    assert out.shape == (batch, heads, seq_len, 5)
    assert indices.shape == weights.shape == (batch, heads, seq_len, 2)
    assert lse.shape == (batch, heads, seq_len)
    (out.sum() + weights.sum() + lse.sum()).backward()
    assert q.grad.shape == q.shape and keys.grad.abs().sum() == 0


def test_noncontiguous_inputs():
    q, keys, values = _inputs(2, 4, 2, 5, 12, 6, 4)
    q_nc = q.transpose(1, 2).contiguous().transpose(1, 2)
    keys_nc = keys.transpose(-1, -2).contiguous().transpose(-1, -2)
    values_nc = values[..., ::1].transpose(0, 1).contiguous().transpose(0, 1)
    assert not q_nc.is_contiguous() and not keys_nc.is_contiguous()
    for a, e in zip(topk_memory_read_ref(q_nc, keys_nc, values_nc, 3),
                    topk_memory_read_ref(q, keys, values, 3)):
        assert torch.equal(a, e)


def test_select_then_gather_is_the_read():
    q, keys, values = _inputs(2, 4, 2, 5, 12, 6, 4, shared=True)
    valid_len = torch.tensor([12, 2])
    out, indices, weights, lse = topk_memory_read_ref(q, keys, values, 3, valid_len=valid_len)
    sel = topk_read_select(q, keys, 3, None, valid_len)
    g_out, g_weights, g_lse = topk_read_gather(q, keys, values, sel)
    assert torch.equal(sel, indices)
    assert torch.equal(g_out, out) and torch.equal(g_weights, weights) and torch.equal(g_lse, lse)


def test_gather_arbitrary_indices():
    q, keys, values = _inputs(1, 2, 1, 3, 9, 4, 3)
    indices = torch.tensor([[4, -1, 8, 0], [-1, -1, 2, 2], [-1, -1, -1, -1]]).expand(1, 2, 3, 4)
    out, weights, lse = topk_read_gather(q, keys, values, indices)
    for h in range(2):
        for t in range(3):
            live = [n for n in indices[0, h, t].tolist() if n >= 0]
            if not live:
                assert torch.isneginf(lse[0, h, t]) and (out[0, h, t] == 0).all()
                continue
            scores = keys[0, 0, live] @ q[0, h, t] * 0.5
            assert torch.allclose(lse[0, h, t], torch.logsumexp(scores, 0))
            assert torch.allclose(out[0, h, t], torch.softmax(scores, 0) @ values[0, 0, live])
            live_mask = indices[0, h, t] >= 0
            assert torch.allclose(weights[0, h, t][live_mask], torch.softmax(scores, 0))
            assert (weights[0, h, t][~live_mask] == 0).all()


# (B, H, Hm, T, N, Dk, Dv, k, shared, valid_len): distinct random scores, no ties.
GRAD_CASES = [
    (2, 2, 2, 3, 6, 4, 3, 3, False, [6, 2]),
    (1, 4, 2, 2, 7, 3, 2, 2, False, None),
    (2, 2, 1, 2, 5, 3, 2, 5, True, [5, 3]),
]


@pytest.mark.parametrize("case", GRAD_CASES)
def test_gradcheck(case):
    batch, heads, mem_heads, seq_len, num_slots, dim_k, dim_v, k, shared, valid_len = case
    q, keys, values = _inputs(batch, heads, mem_heads, seq_len, num_slots, dim_k, dim_v, shared,
                              seed=7)
    valid_len = None if valid_len is None else torch.tensor(valid_len)
    inputs = tuple(x.requires_grad_(True) for x in (q, keys, values))

    def read(q, keys, values):
        out, _, weights, lse = topk_memory_read_ref(q, keys, values, k, valid_len=valid_len)
        return out, weights, lse

    assert torch.autograd.gradcheck(read, inputs, eps=1e-6, atol=1e-7)


def test_traces_under_compile():
    torch._dynamo.reset()
    compiled = torch.compile(topk_memory_read_ref, fullgraph=True, backend="eager")
    q, keys, values = _inputs(2, 4, 2, 5, 12, 6, 4, shared=True, dtype=torch.float32)
    valid_len = torch.tensor([12, 2])
    for a, e in zip(compiled(q, keys, values, 3, valid_len=valid_len),
                    topk_memory_read_ref(q, keys, values, 3, valid_len=valid_len)):
        assert torch.equal(a, e)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_dtypes(dtype):
    q, keys, values = _inputs(2, 4, 2, 6, 32, 16, 8, dtype=dtype, seed=5)
    valid_len = torch.tensor([32, 5])
    out, indices, weights, lse = topk_memory_read_ref(q, keys, values, 6, valid_len=valid_len)
    e_out, e_indices, e_weights, e_lse = topk_memory_read_ref(q.double(), keys.double(),
                                                              values.double(), 6,
                                                              valid_len=valid_len)
    assert out.dtype == dtype and weights.dtype == lse.dtype == torch.float32
    assert torch.equal(indices, e_indices)
    assert_close("out", out, e_out, dtype=dtype)
    assert_close("weights", weights, e_weights, dtype=torch.float32)
    assert_close("lse", lse, e_lse, dtype=torch.float32)
