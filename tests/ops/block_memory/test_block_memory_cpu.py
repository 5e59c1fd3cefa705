"""The CPU kernels of the block memory ops, called directly (``l2m_kernels._C``): block_topk_fwd,
block_read_fwd and block_read_bwd against the references of
``l2m_kernels.ops.block_memory.reference``, computed in float64 from the same inputs. Outputs start
as NaN, so an element a kernel forgets to write fails the comparison."""
from __future__ import annotations

import pytest
import torch

from l2m_kernels import _ext
from l2m_kernels.ops.block_memory.reference import (block_read_ref, block_scores_ref,
                                                    block_topk_ref, select_blocks)
from l2m_kernels.testing import assert_close, nan_filled

ext = _ext.cpu_extension()
pytestmark = pytest.mark.skipif(ext is None, reason=f"needs l2m_kernels._C: {_ext.cpu_extension_error()}")

DTYPES = [torch.float32, torch.float64, torch.bfloat16]


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(shape, dtype, gen):
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


def _strided_q(B, H, T, D, dtype, gen):
    """(B, H, T, D) as a projection lies: a (B, T, H, D) tensor transposed."""
    return _randn((B, T, H, D), dtype, gen).transpose(1, 2)


def _narrowed(shape, dtype, gen, extra=3, start=1):
    """A (B, Hk, NB, X, Y) window (narrow along dim 2) of a larger buffer."""
    B, Hk, NB, X, Y = shape
    return _randn((B, Hk, NB + extra, X, Y), dtype, gen).narrow(2, start, NB)


# ---- block_topk_fwd ----

def topk_fwd(q, reprs, k, repr_valid=None, scale=0.5):
    B, Hk, NB = reprs.shape[:3]
    indices = torch.full((B, Hk, k), -7, dtype=torch.int64)
    scores = nan_filled((B, Hk, NB), _acc(q.dtype))
    ext.block_topk_fwd(q, reprs, repr_valid, k, scale, indices, scores)
    return indices, scores


def check_topk(q, reprs, k, repr_valid=None, scale=0.5):
    indices, scores = topk_fwd(q, reprs, k, repr_valid, scale)
    expected = block_scores_ref(q.double(), reprs.double(), repr_valid, scale)
    assert torch.equal(torch.isneginf(scores), torch.isneginf(expected))
    assert_close("scores", scores, expected, q.dtype)
    # The selection of the kernel's own scores, by the reference's order.
    assert torch.equal(indices, select_blocks(scores, k))
    return indices, scores


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reprs_per_block", [1, 3])
def test_block_topk_odd_sizes(dtype, reprs_per_block):
    gen = _gen(1)
    B, H, Hk, T, D, NB, R = 2, 4, 2, 5, 7, 9, reprs_per_block
    q = _randn((B, H, T, D), dtype, gen)
    reprs = _randn((B, Hk, NB, R, D), dtype, gen)
    valid = torch.rand((B, NB, R), generator=gen) < 0.7
    valid[0, 2] = False  # a block without a valid representative: -inf
    valid[1, 5] = False
    reprs[0, :, 2] = float("nan")  # ... whose representatives must not leak
    if R > 1:
        reprs[1, :, 4, 0] = float("nan")
        valid[1, 4] = torch.tensor([False, True, True])
    for k in (0, 3, NB):
        _, scores = check_topk(q, reprs, k, valid)
        assert torch.isneginf(scores[0, :, 2]).all() and torch.isneginf(scores[1, :, 5]).all()
    check_topk(q, reprs, 4)  # every representative valid


@pytest.mark.parametrize("reprs_per_block", [1, 4])
def test_block_topk_ties_and_reference(reprs_per_block):
    gen = _gen(2)
    B, H, Hk, T, D, NB, R = 1, 2, 1, 3, 8, 8, reprs_per_block
    q = _randn((B, H, T, D), torch.float32, gen)
    reprs = _randn((B, Hk, NB, R, D), torch.float32, gen)
    reprs[:, :, [1, 3, 6]] = reprs[:, :, 1:2].clone()  # equal scores: the smaller index first
    valid = torch.ones(B, NB, R, dtype=torch.bool)
    valid[0, 7] = False
    for k in (1, 2, 3, 5, NB):
        indices, scores = topk_fwd(q, reprs, k, valid, 0.25)
        ref_indices, ref_scores = block_topk_ref(q, reprs, k, valid, 0.25)
        assert scores[0, 0, 1] == scores[0, 0, 3] == scores[0, 0, 6]
        assert torch.equal(indices, select_blocks(scores, k))
        assert torch.equal(indices, ref_indices), (k, indices, ref_indices)
    # NaN ranks first, -inf last.
    reprs[0, 0, 5] = float("nan")
    indices, _ = topk_fwd(q, reprs, 1, valid)
    assert indices.tolist() == [[[5]]]
    indices, _ = topk_fwd(q, reprs, NB, valid)
    assert indices.tolist() == [[list(range(NB))]]


@pytest.mark.parametrize("reprs_per_block", [1, 20])
def test_block_topk_strided_and_tiles(reprs_per_block):
    gen = _gen(3)
    B, H, Hk, T, D, NB, R = 2, 4, 2, 40, 33, 13, reprs_per_block  # 80 rows per kv head
    q = _strided_q(B, H, T, D, torch.float32, gen)
    reprs = _narrowed((B, Hk, NB, R, D), torch.float32, gen)
    big_valid = torch.rand((B, NB + 2, R + 1), generator=gen) < 0.8
    valid = big_valid[:, 1:NB + 1, :R]  # strided mask
    check_topk(q, reprs, 5, valid)
    check_topk(q, reprs, 5, None)


def test_block_topk_empty():
    gen = _gen(4)
    q = _randn((2, 2, 0, 4), torch.float32, gen)
    reprs = _randn((2, 1, 3, 2, 4), torch.float32, gen)
    indices, scores = check_topk(q, reprs, 2)
    assert (scores == 0).all()  # a sum over no rows
    for R in (1, 2):
        q = _randn((0, 2, 3, 4), torch.float32, gen)
        reprs = _randn((0, 1, 3, R, 4), torch.float32, gen)
        indices, scores = topk_fwd(q, reprs, 2)
        assert indices.shape == (0, 1, 2) and scores.shape == (0, 1, 3)
    q = _randn((1, 2, 3, 4), torch.float32, gen)
    _, scores = topk_fwd(q, _randn((1, 1, 3, 0, 4), torch.float32, gen), 1)
    assert torch.isneginf(scores).all()


# ---- block_read_fwd / block_read_bwd ----

def read_fwd(q, keys, values, indices, valid, scale):
    B, H, T, _ = q.shape
    out = nan_filled((B, H, T, values.shape[-1]), q.dtype)
    lse = nan_filled((B, H, T), _acc(q.dtype))
    ext.block_read_fwd(q, keys, values, indices, valid, scale, out, lse)
    return out, lse


def read_bwd(dout, dlse, q, keys, values, indices, valid, out, lse, scale):
    dq = nan_filled(q.shape, q.dtype)
    dkeys = nan_filled(keys.shape, q.dtype)
    dvalues = nan_filled(values.shape, q.dtype)
    ext.block_read_bwd(dout, dlse, q, keys, values, indices, valid, out, lse, scale, dq, dkeys,
                       dvalues)
    return dq, dkeys, dvalues


def reference_read(q, keys, values, indices, valid, scale, dout, dlse):
    """The reference's outputs and gradients in float64."""
    def fn(q, keys, values):
        return block_read_ref(q, keys, values, indices, valid, scale)
    (out, lse), vjp = torch.func.vjp(fn, q.double(), keys.double(), values.double())
    return out, lse, list(vjp((dout.double(), dlse.double())))


def check_read(q, keys, values, indices, valid, scale, gen):
    """The kernels against the reference."""
    dtype = q.dtype
    out, lse = read_fwd(q, keys, values, indices, valid, scale)
    dout = _randn(out.shape, dtype, gen)
    dlse = _randn(lse.shape, _acc(dtype), gen)
    ref_out, ref_lse, ref_grads = reference_read(q, keys, values, indices, valid, scale, dout, dlse)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    assert_close("out", out, ref_out, dtype)
    assert_close("lse", lse, ref_lse, dtype)
    grads = read_bwd(dout, dlse, q, keys, values, indices, valid, out, lse, scale)
    for name, grad, ref in zip(("dq", "dkeys", "dvalues"), grads, ref_grads):
        assert not grad.isnan().any(), name
        assert_close(name, grad, ref, dtype)
    return out, lse, grads


@pytest.mark.parametrize("dtype", DTYPES)
def test_block_read_odd_sizes(dtype):
    gen = _gen(5)
    B, H, Hk, T, D, Dv, NB, S, K = 2, 4, 2, 5, 7, 5, 6, 3, 4
    q = _randn((B, H, T, D), dtype, gen)
    keys = _randn((B, Hk, NB, S, D), dtype, gen)
    values = _randn((B, Hk, NB, S, Dv), dtype, gen)
    indices = torch.tensor([[[0, 2, 2, 5], [1, 3, 4, 1]], [[4, 4, 4, 0], [5, 1, 0, 3]]])
    valid = torch.rand((B, NB, S), generator=gen) < 0.7
    valid[1, 4] = False  # batch 1, kv head 0 reads blocks 4 and 0 only: no valid token at all
    valid[1, 0] = False
    valid[0, 2, 1] = False
    # Invalid tokens holding NaN and inf must not leak.
    invalid = ~valid[:, None].expand(-1, Hk, -1, -1)
    clean = (keys.masked_fill(invalid[..., None], 0), values.masked_fill(invalid[..., None], 0))
    keys[invalid] = float("nan")
    values[invalid] = float("inf")
    out, lse, (dq, dkeys, dvalues) = check_read(q, keys, values, indices, valid, D ** -0.5, gen)
    assert torch.isneginf(lse[1, :2]).all() and not torch.isneginf(lse[1, 2:]).any()
    assert (out[1, :2] == 0).all() and (dq[1, :2] == 0).all()
    assert (dkeys[0, 0, [1, 3, 4]] == 0).all() and (dvalues[0, 1, [0, 2]] == 0).all()
    # Every token valid.
    check_read(q, *clean, indices, None, 0.3, gen)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_block_read_strided_and_tiles(dtype):
    gen = _gen(6)
    B, H, Hk, T, D, Dv, NB, S, K = 1, 4, 1, 40, 64, 24, 10, 20, 5  # 160 rows, tiles straddle blocks
    q = _strided_q(B, H, T, D, dtype, gen)
    keys = _narrowed((B, Hk, NB, S, D), dtype, gen)
    values = _narrowed((B, Hk, NB, S, Dv), dtype, gen, extra=1, start=0)
    indices = torch.tensor([[[7, 1, 9, 1, 3]]])
    big_valid = torch.rand((B, NB, S + 5), generator=gen) < 0.8
    check_read(q, keys, values, indices, big_valid[:, :, 2:S + 2], 0.2, gen)


def test_block_read_no_selection_and_empty():
    gen = _gen(7)
    B, H, Hk, T, D, Dv, NB, S = 2, 2, 1, 3, 4, 5, 3, 2
    q = _randn((B, H, T, D), torch.float32, gen)
    keys = _randn((B, Hk, NB, S, D), torch.float32, gen)
    values = _randn((B, Hk, NB, S, Dv), torch.float32, gen)
    indices = torch.zeros((B, Hk, 0), dtype=torch.int64)
    out, lse, (dq, dkeys, dvalues) = check_read(q, keys, values, indices, None, 0.5, gen)
    assert (out == 0).all() and torch.isneginf(lse).all()
    assert (dq == 0).all() and (dkeys == 0).all() and (dvalues == 0).all()
    # T = 0: no rows, dkeys and dvalues still written (zeros).
    indices = torch.tensor([[[1, 2]], [[0, 0]]])
    q0 = _randn((B, H, 0, D), torch.float32, gen)
    _, _, (dq, dkeys, dvalues) = check_read(q0, keys, values, indices, None, 0.5, gen)
    assert (dkeys == 0).all() and (dvalues == 0).all()
    # B = 0.
    check_read(_randn((0, H, T, D), torch.float32, gen), keys[:0], values[:0], indices[:0], None,
               0.5, gen)


def test_block_read_bwd_deterministic():
    gen = _gen(8)
    B, H, Hk, T, D, Dv, NB, S = 2, 4, 2, 33, 16, 16, 8, 16
    q = _randn((B, H, T, D), torch.float32, gen)
    keys = _randn((B, Hk, NB, S, D), torch.float32, gen)
    values = _randn((B, Hk, NB, S, Dv), torch.float32, gen)
    indices = torch.randint(0, NB, (B, Hk, 6), generator=gen)
    out, lse = read_fwd(q, keys, values, indices, None, 0.25)
    dout, dlse = _randn(out.shape, torch.float32, gen), _randn(lse.shape, torch.float32, gen)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(read_bwd(dout, dlse, q, keys, values, indices, None, out, lse, 0.25)
                           + read_fwd(q, keys, values, indices, None, 0.25))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


# ---- argument checks ----

def test_invalid_arguments():
    gen = _gen(9)
    B, H, Hk, T, D, Dv, NB, S = 1, 2, 1, 3, 4, 5, 3, 2
    q = _randn((B, H, T, D), torch.float32, gen)
    keys = _randn((B, Hk, NB, S, D), torch.float32, gen)
    values = _randn((B, Hk, NB, S, Dv), torch.float32, gen)
    indices = torch.tensor([[[0, 2]]])
    with pytest.raises(IndexError, match="indices"):
        read_fwd(q, keys, values, torch.tensor([[[0, 3]]]), None, 1.0)
    with pytest.raises(IndexError, match="indices"):
        read_fwd(q, keys, values, torch.tensor([[[-1, 0]]]), None, 1.0)
    with pytest.raises(ValueError, match="block_values"):
        read_fwd(q, keys, values[:, :, :2], indices, None, 1.0)
    with pytest.raises(ValueError, match="block_keys"):
        read_fwd(q, _randn((B, 3, NB, S, D), torch.float32, gen), values, indices, None, 1.0)
    with pytest.raises(ValueError, match="block_keys"):
        read_fwd(q, _randn((B, Hk, NB, D, S), torch.float32, gen).transpose(3, 4), values,
                 indices, None, 1.0)
    with pytest.raises(TypeError, match="block_valid"):
        read_fwd(q, keys, values, indices, torch.ones(B, NB, S), 1.0)
    with pytest.raises(ValueError, match="block_valid"):
        read_fwd(q, keys, values, indices, torch.ones(B, NB, S + 1, dtype=torch.bool), 1.0)
    with pytest.raises(TypeError, match="indices"):
        read_fwd(q, keys, values, indices.int(), None, 1.0)
    reprs = _randn((B, Hk, NB, 2, D), torch.float32, gen)
    with pytest.raises(ValueError, match="k must be in"):
        topk_fwd(q, reprs, NB + 1)
    with pytest.raises(ValueError, match="k must be in"):
        ext.block_topk_fwd(q, reprs, None, -1, 1.0, torch.empty(B, Hk, 0, dtype=torch.int64),
                           torch.empty(B, Hk, NB))
    with pytest.raises(ValueError, match="reprs"):
        topk_fwd(q, _randn((B, Hk, NB, D, 2), torch.float32, gen).transpose(3, 4), 1)
    with pytest.raises(TypeError, match="reprs"):
        topk_fwd(q, reprs.double(), 1)
    with pytest.raises(ValueError, match="repr_valid"):
        topk_fwd(q, reprs, 1, torch.ones(B, NB, 3, dtype=torch.bool))
    out, lse = read_fwd(q, keys, values, indices, None, 1.0)
    with pytest.raises(ValueError, match="dkeys"):
        ext.block_read_bwd(out, lse, q, keys, values, indices, None, out, lse, 1.0,
                           torch.empty_like(q), torch.empty(B, Hk, NB, S, D + 1),
                           torch.empty_like(values))
