"""The reference memory attention against brute-force loops and the composition of SPEC section 5."""
from __future__ import annotations

import math

import pytest
import torch

from l2m_kernels.ops.memory_attention.reference import (
    local_attention_ref,
    memory_attention_gather,
    memory_attention_ref,
)
from l2m_kernels.ops.merge.reference import gated_merge_ref, merge_attention_ref
from l2m_kernels.ops.topk_read.reference import topk_memory_read_ref
from l2m_kernels.testing import assert_close

NEG_INF = float("-inf")


def brute_local_attention(q, k, v, window=None, scale=None):
    """Per query: the visible keys one by one, softmax in float64 Python floats."""
    q, k, v = (x.detach().double() for x in (q, k, v))
    batch, heads, seq_len, dim = q.shape
    kv_heads, context_len, dim_v = k.shape[1], k.shape[2], v.shape[-1]
    scale = dim ** -0.5 if scale is None else scale
    out = torch.zeros(batch, heads, seq_len, dim_v, dtype=torch.float64)
    lse = torch.full((batch, heads, seq_len), NEG_INF, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            hkv = h // (heads // kv_heads)
            for t in range(seq_len):
                p = context_len - seq_len + t
                visible = [j for j in range(context_len)
                           if j <= p and (window is None or j > p - window)]
                scores = [scale * float(torch.dot(q[b, h, t], k[b, hkv, j])) for j in visible]
                if not scores:
                    continue
                top = max(scores)
                total = sum(math.exp(s - top) for s in scores)
                for s, j in zip(scores, visible):
                    out[b, h, t] += math.exp(s - top) / total * v[b, hkv, j]
                lse[b, h, t] = top + math.log(total)
    return out, lse


def _randn(*shape, gen, dtype=torch.float64):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def _attention_inputs(batch, heads, kv_heads, seq_len, context_len, dim, dim_v, mem_heads,
                      num_slots, shared=False, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mem_lead = (mem_heads, num_slots) if shared else (batch, mem_heads, num_slots)
    return (
        _randn(batch, heads, seq_len, dim, gen=gen, dtype=dtype),
        _randn(batch, kv_heads, context_len, dim, gen=gen, dtype=dtype),
        _randn(batch, kv_heads, context_len, dim_v, gen=gen, dtype=dtype),
        _randn(*mem_lead, dim, gen=gen, dtype=dtype),
        _randn(*mem_lead, dim_v, gen=gen, dtype=dtype),
    )


# (B, H, Hkv, T, S, D, Dv)
LOCAL_SHAPES = [
    (2, 2, 2, 5, 5, 4, 3),
    (2, 2, 2, 5, 9, 4, 3),    # S > T
    (1, 4, 2, 4, 7, 4, 5),    # grouped kv heads
    (1, 4, 1, 3, 8, 8, 2),    # one kv head
    (1, 1, 1, 7, 13, 7, 7),   # odd sizes
]


@pytest.mark.parametrize("shape", LOCAL_SHAPES, ids=lambda s: "B{}H{}Hkv{}T{}S{}D{}/{}".format(*s))
@pytest.mark.parametrize("window", [1, 3, None])
def test_local_attention_against_brute(shape, window):
    batch, heads, kv_heads, seq_len, context_len, dim, dim_v = shape
    gen = torch.Generator().manual_seed(1)
    q = _randn(batch, heads, seq_len, dim, gen=gen)
    k = _randn(batch, kv_heads, context_len, dim, gen=gen)
    v = _randn(batch, kv_heads, context_len, dim_v, gen=gen)
    out, lse = local_attention_ref(q, k, v, window=window)
    e_out, e_lse = brute_local_attention(q, k, v, window=window)
    assert out.dtype == torch.float64 and lse.dtype == torch.float64
    assert_close("out", out, e_out, tol=1e-12)
    assert_close("lse", lse, e_lse, tol=1e-12)


def test_local_attention_scale_and_float32():
    gen = torch.Generator().manual_seed(2)
    q, k, v = (_randn(2, 2, n, 4, gen=gen, dtype=torch.float32) for n in (3, 6, 6))
    out, lse = local_attention_ref(q, k, v, window=4, scale=0.3)
    e_out, e_lse = brute_local_attention(q, k, v, window=4, scale=0.3)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert_close("out", out, e_out, tol=1e-6)
    assert_close("lse", lse, e_lse, tol=1e-6)


def test_local_attention_nonfinite_future_values_do_not_leak():
    gen = torch.Generator().manual_seed(3)
    q = _randn(1, 2, 4, 4, gen=gen)
    k = _randn(1, 1, 6, 4, gen=gen)
    v = _randn(1, 1, 6, 3, gen=gen)
    clean_out, clean_lse = local_attention_ref(q, k, v, window=2)
    v_bad, k_bad = v.clone(), k.clone()
    # Query t sits at p = t + 2 and sees positions p - 1, p: position 0 is seen by nobody,
    # position 4 only by t = 2 and t = 3.
    v_bad[0, 0, 4, 1] = float("nan")
    k_bad[0, 0, 0] = float("nan")
    v_bad[0, 0, 0] = float("inf")
    out, lse = local_attention_ref(q, k_bad, v_bad, window=2)
    assert torch.equal(out[:, :, :2], clean_out[:, :, :2]) and torch.equal(lse, clean_lse)
    assert torch.isnan(out[:, :, 2:, 1]).all()
    assert torch.equal(out[:, :, 2:, 0], clean_out[:, :, 2:, 0])


def _composed(q, k, v, mem_keys, mem_values, topk, window, merge, gate, scale, valid_len):
    """SPEC section 5 as a composition of the separately written reference ops (float64)."""
    local, lse_local = local_attention_ref(q, k, v, window=window, scale=scale)
    mem, indices, _, lse_mem = topk_memory_read_ref(q, mem_keys, mem_values, topk, scale=scale,
                                                    valid_len=valid_len)
    if merge == "joint":
        out, _ = merge_attention_ref(local, lse_local, mem, lse_mem)
    else:
        out = gated_merge_ref(local, mem, gate)
    return out, lse_local, lse_mem, indices


def brute_joint_attention(q, k, v, mem_keys, mem_values, indices, window, scale=None):
    """One softmax per query over the visible local keys and its memory entries together."""
    q, k, v, mem_keys, mem_values = (x.double() for x in (q, k, v, mem_keys, mem_values))
    batch, heads, seq_len, dim = q.shape
    kv_heads, context_len = k.shape[1], k.shape[2]
    mem_heads = mem_keys.shape[-3]
    scale = dim ** -0.5 if scale is None else scale
    out = torch.zeros(batch, heads, seq_len, v.shape[-1], dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            hkv, hm = h // (heads // kv_heads), h // (heads // mem_heads)
            mk = mem_keys[hm] if mem_keys.dim() == 3 else mem_keys[b, hm]
            mv = mem_values[hm] if mem_values.dim() == 3 else mem_values[b, hm]
            for t in range(seq_len):
                p = context_len - seq_len + t
                entries = [(k[b, hkv, j], v[b, hkv, j]) for j in range(context_len)
                           if j <= p and (window is None or j > p - window)]
                entries += [(mk[n], mv[n]) for n in indices[b, h, t].tolist() if n >= 0]
                scores = [scale * float(torch.dot(q[b, h, t], key)) for key, _ in entries]
                top = max(scores)
                total = sum(math.exp(s - top) for s in scores)
                for s, (_, value) in zip(scores, entries):
                    out[b, h, t] += math.exp(s - top) / total * value
    return out


# (B, H, Hkv, Hm, T, S, D, Dv, N, topk, window, shared, valid_len)
MEMORY_CASES = [
    (2, 2, 2, 2, 4, 6, 4, 3, 10, 3, 2, False, None),
    (2, 4, 2, 1, 3, 5, 4, 5, 9, 4, None, True, [9, 2]),
    (3, 4, 1, 2, 5, 5, 8, 4, 12, 5, 3, False, [0, 3, 12]),
    (1, 3, 3, 3, 7, 9, 7, 5, 13, 13, 1, True, None),
]


@pytest.mark.parametrize("case", MEMORY_CASES)
@pytest.mark.parametrize("merge", ["joint", "gate"])
def test_memory_attention_composition(case, merge):
    batch, heads, kv_heads, mem_heads, seq_len, context_len, dim, dim_v, num_slots, topk, window, \
        shared, valid_len = case
    q, k, v, mem_keys, mem_values = _attention_inputs(batch, heads, kv_heads, seq_len, context_len,
                                                      dim, dim_v, mem_heads, num_slots, shared)
    valid_len = None if valid_len is None else torch.tensor(valid_len)
    gate = torch.randn(heads, 1, 1, dtype=torch.float64) if merge == "gate" else None
    got = memory_attention_ref(q, k, v, mem_keys, mem_values, topk, window=window, merge=merge,
                               gate=gate, valid_len=valid_len)
    expected = _composed(q, k, v, mem_keys, mem_values, topk, window, merge, gate, None, valid_len)
    out, lse_local, lse_mem, indices = got
    assert out.shape == (batch, heads, seq_len, dim_v) and indices.shape == (batch, heads, seq_len, topk)
    assert out.dtype == lse_local.dtype == lse_mem.dtype == torch.float64
    assert indices.dtype == torch.int64
    assert torch.equal(indices, expected[3])
    assert_close("out", out, expected[0], tol=1e-13)
    assert_close("lse_local", lse_local, expected[1], tol=1e-13)
    assert torch.equal(torch.isneginf(lse_mem), torch.isneginf(expected[2]))
    assert_close("lse_mem", lse_mem, expected[2], tol=1e-13)
    if merge == "joint":
        e_out = brute_joint_attention(q, k, v, mem_keys, mem_values, indices, window)
        assert_close("out (brute)", out, e_out, tol=1e-12)


def test_gather_matches_ref_and_merge_checks():
    q, k, v, mem_keys, mem_values = _attention_inputs(2, 2, 1, 3, 5, 4, 3, 2, 8, shared=True)
    out, lse_local, lse_mem, indices = memory_attention_ref(q, k, v, mem_keys, mem_values, 3,
                                                            window=2, scale=0.4)
    g_out, g_lse_local, g_lse_mem = memory_attention_gather(q, k, v, mem_keys, mem_values, indices,
                                                            window=2, scale=0.4)
    assert torch.equal(g_out, out) and torch.equal(g_lse_local, lse_local)
    assert torch.equal(g_lse_mem, lse_mem)
    with pytest.raises(ValueError, match="gate"):
        memory_attention_ref(q, k, v, mem_keys, mem_values, 3, merge="gate")
    with pytest.raises(ValueError, match="merge"):
        memory_attention_ref(q, k, v, mem_keys, mem_values, 3, merge="sum")


def test_empty_memory_gives_local_attention():
    q, k, v, mem_keys, mem_values = _attention_inputs(2, 2, 2, 3, 5, 4, 3, 2, 8)
    for x in (q, k, v, mem_keys, mem_values):
        x.requires_grad_(True)
    out, lse_local, lse_mem, indices = memory_attention_ref(q, k, v, mem_keys, mem_values, 3,
                                                            valid_len=torch.tensor([0, 0]))
    local, e_lse_local = local_attention_ref(q, k, v)
    assert torch.isneginf(lse_mem).all() and (indices == -1).all()
    assert_close("out", out, local, tol=1e-15)
    assert torch.equal(lse_local, e_lse_local)
    out.sum().backward()
    assert torch.equal(mem_keys.grad, torch.zeros_like(mem_keys))
    assert torch.equal(mem_values.grad, torch.zeros_like(mem_values))
    assert torch.isfinite(q.grad).all()


def test_nan_query_row_is_isolated():
    q, k, v, mem_keys, mem_values = _attention_inputs(1, 2, 1, 4, 6, 4, 3, 1, 8)
    clean = memory_attention_ref(q, k, v, mem_keys, mem_values, 3, window=3)
    q[0, 1, 2, 0] = float("nan")
    out, lse_local, lse_mem, indices = memory_attention_ref(q, k, v, mem_keys, mem_values, 3, window=3)
    assert torch.isnan(out[0, 1, 2]).all() and torch.isnan(lse_local[0, 1, 2])
    assert torch.isnan(lse_mem[0, 1, 2])
    others = torch.ones(q.shape[:3], dtype=torch.bool)
    others[0, 1, 2] = False
    for a, e in zip((out, lse_local, lse_mem, indices), clean):
        assert torch.equal(a[others], e[others])


@pytest.mark.parametrize("shape", [(0, 2, 3), (2, 2, 0)], ids=["B0", "T0"])
def test_empty_batch(shape):
    batch, heads, seq_len = shape
    q = torch.randn(batch, heads, seq_len, 4, requires_grad=True)
    k = torch.randn(batch, 1, 5, 4, requires_grad=True)
    v = torch.randn(batch, 1, 5, 3, requires_grad=True)
    mem_keys, mem_values = torch.randn(1, 6, 4), torch.randn(1, 6, 3)
    out, lse_local, lse_mem, indices = memory_attention_ref(q, k, v, mem_keys, mem_values, 2,
                                                            window=2)
    assert out.shape == (batch, heads, seq_len, 3) and indices.shape == (batch, heads, seq_len, 2)
    assert lse_local.shape == lse_mem.shape == (batch, heads, seq_len)
    out.sum().backward()
    assert q.grad.shape == q.shape


# (B, H, Hkv, Hm, T, S, D, Dv, N, topk, window, shared, valid_len, merge)
GRAD_CASES = [
    (1, 2, 1, 2, 3, 4, 3, 2, 6, 2, 2, False, None, "joint"),
    (2, 2, 2, 1, 2, 3, 3, 2, 5, 3, None, True, [5, 2], "joint"),
    (2, 2, 1, 1, 3, 3, 3, 2, 5, 2, 2, False, [1, 5], "gate"),
]


@pytest.mark.parametrize("case", GRAD_CASES)
def test_gradcheck(case):
    batch, heads, kv_heads, mem_heads, seq_len, context_len, dim, dim_v, num_slots, topk, window, \
        shared, valid_len, merge = case
    inputs = _attention_inputs(batch, heads, kv_heads, seq_len, context_len, dim, dim_v, mem_heads,
                               num_slots, shared, seed=11)
    valid_len = None if valid_len is None else torch.tensor(valid_len)
    if merge == "gate":
        inputs = inputs + (torch.randn(heads, 1, 1, dtype=torch.float64),)
    inputs = tuple(x.requires_grad_(True) for x in inputs)

    def attend(q, k, v, mem_keys, mem_values, gate=None):
        out, lse_local, lse_mem, _ = memory_attention_ref(q, k, v, mem_keys, mem_values, topk,
                                                          window=window, merge=merge, gate=gate,
                                                          valid_len=valid_len)
        return out, lse_local, lse_mem

    assert torch.autograd.gradcheck(attend, inputs, eps=1e-6, atol=1e-7)


def test_traces_under_compile():
    torch._dynamo.reset()
    compiled = torch.compile(memory_attention_ref, fullgraph=True, backend="eager")
    q, k, v, mem_keys, mem_values = _attention_inputs(2, 2, 1, 3, 5, 4, 3, 2, 8, shared=True,
                                                      dtype=torch.float32)
    gate = torch.randn(2, 1, 1)
    kwargs = dict(window=2, merge="gate", gate=gate, valid_len=torch.tensor([8, 2]))
    for a, e in zip(compiled(q, k, v, mem_keys, mem_values, 3, **kwargs),
                    memory_attention_ref(q, k, v, mem_keys, mem_values, 3, **kwargs)):
        assert torch.equal(a, e)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("merge", ["joint", "gate"])
def test_low_precision_dtypes(dtype, merge):
    inputs = _attention_inputs(2, 4, 2, 5, 9, 16, 8, 2, 24, dtype=dtype, seed=4)
    gate = torch.randn(4, 1, 1, dtype=torch.float64) if merge == "gate" else None
    kwargs = dict(window=4, merge=merge, valid_len=torch.tensor([24, 3]))
    out, lse_local, lse_mem, indices = memory_attention_ref(
        *inputs, 5, gate=None if gate is None else gate.to(dtype), **kwargs)
    e_out, e_lse_local, e_lse_mem, e_indices = memory_attention_ref(
        *(x.double() for x in inputs), 5, gate=None if gate is None else gate.to(dtype).double(),
        **kwargs)
    assert out.dtype == dtype and lse_local.dtype == lse_mem.dtype == torch.float32
    assert torch.equal(indices, e_indices)
    assert_close("out", out, e_out, dtype=dtype)
    assert_close("lse_local", lse_local, e_lse_local, dtype=torch.float32)
    assert_close("lse_mem", lse_mem, e_lse_mem, dtype=torch.float32)


def test_local_attention_visible_inf_is_not_spoiled_by_an_invisible_one():
    # Query 0 (position 0) sees only position 0, whose value is +inf: its output is +inf. Query 1
    # also sees position 1, +inf too. The reference took weights @ v for rows that see a non-finite
    # value, so query 0's zero weight on position 1 made 0 * inf = NaN (found by the fuzzer).
    q = torch.randn(1, 1, 2, 16, dtype=torch.float64)
    k = torch.randn(1, 1, 2, 16, dtype=torch.float64)
    v = torch.full((1, 1, 2, 1), float("inf"), dtype=torch.float64)
    out, _ = local_attention_ref(q, k, v)
    assert torch.equal(out, torch.full_like(out, float("inf")))
    v[0, 0, 1, 0] = float("-inf")   # visible +inf and -inf: NaN; query 0 still sees only +inf
    out, _ = local_attention_ref(q, k, v)
    assert out[0, 0, 0, 0] == float("inf") and torch.isnan(out[0, 0, 1, 0])


@pytest.mark.parametrize("T", [0, 2])
def test_local_attention_empty_context(T):
    # S = 0 keys (with T = 0 queries) is a legal empty call; with no key to see, a query has
    # out = 0 and lse = -inf. The reference's softmax refused the empty reduction (found by the fuzzer).
    q = torch.randn(2, 3, T, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 3, 0, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 3, 0, 5, dtype=torch.float64, requires_grad=True)
    out, lse = local_attention_ref(q, k, v)
    assert out.shape == (2, 3, T, 5) and torch.equal(out, torch.zeros_like(out))
    assert lse.shape == (2, 3, T) and torch.isneginf(lse).all()
    (out.sum() + lse.nan_to_num(neginf=0.0).sum()).backward()
    mem_keys, mem_values = torch.randn(3, 4, 4, dtype=torch.float64), torch.randn(3, 4, 5, dtype=torch.float64)
    if T == 0:   # a whole memory attention call with S = T = 0
        res = memory_attention_ref(q, k, v, mem_keys, mem_values, 2)
        assert res[0].shape == (2, 3, 0, 5)
