"""The product-key read reference against brute force over all slots (SPEC section 2)."""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from l2m_kernels.ops.product_key.reference import (
    product_key_gather,
    product_key_read_ref,
    product_key_select,
)
from l2m_kernels.testing import assert_close


def brute_force_read(q, subkeys, values, k, k_sub, scale, sum_heads=False):
    """SPEC 2 read literally, per (b, h, t) in float64, with selection by Python tuple sorts."""
    q, subkeys, values = (x.detach().to(torch.float64) for x in (q, subkeys, values))
    batch, heads, steps, key_dim = q.shape
    n_sub = subkeys.shape[2]
    half = key_dim // 2
    indices = torch.zeros(batch, heads, steps, k, dtype=torch.int64)
    weights = torch.zeros(batch, heads, steps, k, dtype=torch.float64)
    lse = torch.zeros(batch, heads, steps, dtype=torch.float64)
    out = torch.zeros(batch, heads, steps, values.shape[1], dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            for t in range(steps):
                s1 = [scale * float(torch.dot(q[b, h, t, :half], subkeys[h, 0, i])) for i in range(n_sub)]
                s2 = [scale * float(torch.dot(q[b, h, t, half:], subkeys[h, 1, j])) for j in range(n_sub)]
                top1 = sorted(range(n_sub), key=lambda i: (-s1[i], i))[:k_sub]
                top2 = sorted(range(n_sub), key=lambda j: (-s2[j], j))[:k_sub]
                cands = sorted(((s1[i] + s2[j], i * n_sub + j) for i in top1 for j in top2),
                               key=lambda c: (-c[0], c[1]))[:k]
                scores = [score for score, _ in cands]
                top = max(scores)
                total = sum(math.exp(s - top) for s in scores)
                for m, (score, slot) in enumerate(cands):
                    indices[b, h, t, m] = slot
                    weights[b, h, t, m] = math.exp(score - top) / total
                    out[b, h, t] += weights[b, h, t, m] * values[slot]
                lse[b, h, t] = top + math.log(total)
    return (out.sum(1) if sum_heads else out), indices, weights, lse


def brute_force_exact_topk(q, subkeys, k, scale):
    """The exact top-k over all n_sub ** 2 slots, ties by smaller slot."""
    q, subkeys = q.detach().double(), subkeys.detach().double()
    batch, heads, steps, key_dim = q.shape
    n_sub = subkeys.shape[2]
    half = key_dim // 2
    indices = torch.zeros(batch, heads, steps, k, dtype=torch.int64)
    for b in range(batch):
        for h in range(heads):
            for t in range(steps):
                s1 = [scale * float(torch.dot(q[b, h, t, :half], subkeys[h, 0, i])) for i in range(n_sub)]
                s2 = [scale * float(torch.dot(q[b, h, t, half:], subkeys[h, 1, j])) for j in range(n_sub)]
                slots = sorted(range(n_sub * n_sub), key=lambda s: (-(s1[s // n_sub] + s2[s % n_sub]), s))
                indices[b, h, t] = torch.tensor(slots[:k])
    return indices


def make_pkm_inputs(batch=2, heads=3, steps=4, key_dim=6, n_sub=5, value_dim=7, dtype=torch.float64,
                    integer=False, seed=0):
    """Random inputs; ``integer=True`` draws small integers so every score is exact and ties abound."""
    gen = torch.Generator().manual_seed(seed)
    if integer:
        q = torch.randint(-2, 3, (batch, heads, steps, key_dim), generator=gen)
        subkeys = torch.randint(-1, 2, (heads, 2, n_sub, key_dim // 2), generator=gen)
    else:
        q = torch.randn(batch, heads, steps, key_dim, generator=gen, dtype=torch.float64)
        subkeys = torch.randn(heads, 2, n_sub, key_dim // 2, generator=gen, dtype=torch.float64)
    values = torch.randn(n_sub * n_sub, value_dim, generator=gen, dtype=torch.float64)
    return q.to(dtype), subkeys.to(dtype), values.to(dtype)


def check_read(q, subkeys, values, k, k_sub=None, scale=None, sum_heads=False):
    out, indices, weights, lse = product_key_read_ref(q, subkeys, values, k, k_sub=k_sub, scale=scale,
                                                      sum_heads=sum_heads)
    scale_used = q.shape[-1] ** -0.5 if scale is None else scale
    expected = brute_force_read(q, subkeys, values, k, k if k_sub is None else k_sub, scale_used, sum_heads)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    assert out.dtype == q.dtype and indices.dtype == torch.int64
    assert weights.dtype == acc and lse.dtype == acc
    assert torch.equal(indices, expected[1])
    assert_close("out", out, expected[0], dtype=q.dtype)
    assert_close("weights", weights, expected[2], dtype=q.dtype)
    assert_close("lse", lse, expected[3], dtype=q.dtype)
    return out, indices, weights, lse


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k,k_sub", [(4, None), (3, 2), (6, 4), (1, 1)])
def test_random(dtype, k, k_sub):
    check_read(*make_pkm_inputs(dtype=dtype), k, k_sub=k_sub)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k,k_sub", [(5, 3), (9, 3), (7, 5)])
def test_ties_are_exact(dtype, k, k_sub):
    # Small integers: exact scores in every dtype, many equal half scores and candidate scores.
    q, subkeys, values = make_pkm_inputs(integer=True, dtype=dtype, seed=k)
    subkeys[:, :, 3] = subkeys[:, :, 1]  # duplicate subkey rows
    check_read(q, subkeys, values, k, k_sub=k_sub, scale=0.5)


@pytest.mark.parametrize("integer", [False, True])
def test_full_k_sub_is_exact_topk(integer):
    q, subkeys, values = make_pkm_inputs(integer=integer, n_sub=4, seed=3)
    for k in (1, 5, 16):
        indices = product_key_select(q, subkeys, k, k_sub=4, scale=1.0)
        assert torch.equal(indices, brute_force_exact_topk(q, subkeys, k, scale=1.0))
    # Any k_sub >= k is enough for exactness.
    indices = product_key_select(q, subkeys, 3, k_sub=3, scale=1.0)
    assert torch.equal(indices, brute_force_exact_topk(q, subkeys, 3, scale=1.0))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_sum_heads(dtype):
    out, indices, weights, lse = check_read(*make_pkm_inputs(dtype=dtype), 4, k_sub=3, sum_heads=True)
    assert out.shape == (2, 4, 7)


def test_read_is_gather_of_select():
    q, subkeys, values = make_pkm_inputs()
    out, indices, weights, lse = product_key_read_ref(q, subkeys, values, 4, k_sub=3, scale=0.7)
    assert torch.equal(indices, product_key_select(q, subkeys, 4, 3, 0.7))
    gathered = product_key_gather(q, subkeys, values, indices.to(torch.int32), 0.7)
    for a, b in zip((out, weights, lse), gathered):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_sparse_grad_matches_dense(dtype):
    # 12 reads with repeats among 25 slots.
    q, subkeys, values = make_pkm_inputs(dtype=dtype, batch=1, heads=2, steps=2, n_sub=5)
    grads = {}
    for sparse in (False, True):
        leaves = [x.clone().requires_grad_() for x in (q, subkeys, values)]
        out, _, weights, lse = product_key_read_ref(*leaves, 3, k_sub=2, sparse_grad=sparse)
        loss = out.float().square().sum() + weights.sum() * 0.3 + lse.sum()
        grads[sparse] = torch.autograd.grad(loss, leaves)
    dense_grad, sparse_grad = grads[False][2], grads[True][2]
    assert not dense_grad.is_sparse and dense_grad.dtype == dtype
    assert sparse_grad.is_sparse and sparse_grad.is_coalesced() and sparse_grad.dtype == dtype
    assert sparse_grad._nnz() < values.shape[0]  # only touched rows are stored
    assert_close("values grad", sparse_grad.to_dense(), dense_grad, dtype=dtype)
    for dense, sparse in zip(grads[False][:2], grads[True][:2]):
        assert torch.equal(dense, sparse)


def test_sparse_grad_through_backward():
    q, subkeys, values = (x.requires_grad_() for x in make_pkm_inputs())
    product_key_read_ref(q, subkeys, values, 4, sparse_grad=True)[0].sum().backward()
    assert values.grad.is_sparse
    # PyTorch's grad accumulation re-wraps the tensor and drops the flag; the data is coalesced.
    coalesced = values.grad.coalesce()
    assert torch.equal(values.grad._indices(), coalesced._indices())


@pytest.mark.parametrize("sum_heads", [False, True])
def test_gradcheck(sum_heads):
    q, subkeys, values = make_pkm_inputs(batch=1, heads=2, steps=3, key_dim=4, n_sub=3, value_dim=2, seed=5)
    leaves = [x.requires_grad_() for x in (q, subkeys, values)]

    def read(q, subkeys, values):
        out, _, weights, lse = product_key_read_ref(q, subkeys, values, 3, k_sub=2, sum_heads=sum_heads)
        return out, weights, lse

    assert torch.autograd.gradcheck(read, leaves)


def test_gather_gradcheck_fixed_indices():
    q, subkeys, values = make_pkm_inputs(batch=1, heads=2, steps=3, key_dim=4, n_sub=3, value_dim=2, seed=6)
    indices = torch.tensor([[8, 0, 4], [3, 3, 1], [2, 5, 7]]).expand(1, 2, 3, 3)  # any slots, repeats too
    leaves = [x.requires_grad_() for x in (q, subkeys, values)]
    assert torch.autograd.gradcheck(lambda *x: product_key_gather(*x, indices, 0.9), leaves)


class _LargestAllocation(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for tensor in result if isinstance(result, (tuple, list)) else [result]:
            if isinstance(tensor, torch.Tensor) and tensor.layout == torch.strided:
                self.largest = max(self.largest, tensor.numel())
        return result


def test_gather_never_forms_t_by_n():
    # N = 256 slots, T = 8: no tensor may reach T * N elements (nor, with sparse_grad, N * Dv).
    q, subkeys, values = make_pkm_inputs(batch=1, heads=2, steps=8, key_dim=8, n_sub=16, value_dim=4)
    leaves = [x.requires_grad_() for x in (q, subkeys, values)]
    indices = product_key_select(q, subkeys, 4, 4, None)
    with _LargestAllocation() as mode:
        out, weights, lse = product_key_gather(*leaves, indices, sparse_grad=True)
        (out.sum() + lse.sum()).backward()
    assert mode.largest < values.numel() < 8 * 256


@pytest.mark.parametrize("shape", [dict(batch=0), dict(steps=0)])
@pytest.mark.parametrize("sum_heads", [False, True])
def test_empty(shape, sum_heads):
    q, subkeys, values = (x.requires_grad_() for x in make_pkm_inputs(**shape))
    out, indices, weights, lse = product_key_read_ref(q, subkeys, values, 4, sum_heads=sum_heads,
                                                      sparse_grad=True)
    batch, heads, steps = q.shape[:3]
    assert out.shape == ((batch, steps, 7) if sum_heads else (batch, heads, steps, 7))
    assert indices.shape == weights.shape == (batch, heads, steps, 4) and lse.shape == (batch, heads, steps)
    (out.sum() + lse.sum()).backward()
    assert q.grad.shape == q.shape and values.grad._nnz() == 0


@pytest.mark.parametrize("sparse_grad", [False, True])
def test_under_compile(sparse_grad):
    q, subkeys, values = make_pkm_inputs()
    compiled = torch.compile(product_key_read_ref, fullgraph=True, backend="eager")
    results = []
    for fn in (compiled, product_key_read_ref):
        leaves = [x.clone().requires_grad_() for x in (q, subkeys, values)]
        out, indices, weights, lse = fn(*leaves, 4, k_sub=3, sum_heads=True, sparse_grad=sparse_grad)
        grads = torch.autograd.grad(out.square().sum() + lse.sum(), leaves)
        results.append((out, indices, weights, lse) + tuple(g.to_dense() for g in grads))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("sparse_grad", [False, True])
def test_empty_value_rows_backward(sparse_grad):
    # Dv = 0: the values gradient is (n_sub ** 2, 0); its backward reshaped the rows with -1 next to
    # a size of 0, which is ambiguous (found by the fuzzer).
    q = torch.randn(1, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    subkeys = torch.randn(2, 2, 3, 2, dtype=torch.float64, requires_grad=True)
    values = torch.randn(9, 0, dtype=torch.float64, requires_grad=True)
    out, _, weights, lse = product_key_read_ref(q, subkeys, values, 4, k_sub=3, sparse_grad=sparse_grad)
    assert out.shape == (1, 2, 3, 0)
    dq, dsubkeys, dvalues = torch.autograd.grad(out.sum() + weights.sum() + lse.sum(), (q, subkeys, values))
    assert dvalues.shape == (9, 0) and dq.shape == q.shape and dsubkeys.shape == subkeys.shape
