"""block_topk and block_read: every fused backend against the float64 reference, outputs and every
gradient by relative RMS error, on inputs as a block memory holds them (q transposed from a
projection, blocks narrowed from a larger buffer, padding), and under torch.compile and autocast."""
import math

import pytest
import torch

import l2m_kernels as l2m
from l2m_kernels.ops.block_memory.reference import block_read_ref, block_scores_ref, select_blocks
from l2m_kernels.testing import assert_close, fused_backend_params, lse_dtype, rand, skip_unless_served

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# (B, H, Hk, T, NB, S, D, Dv, k)
SHAPES = [(1, 1, 1, 1, 1, 1, 1, 1, 1), (2, 4, 2, 7, 9, 5, 7, 5, 3), (1, 6, 2, 33, 20, 16, 64, 40, 8),
          (2, 2, 1, 5, 6, 70, 33, 17, 6), (0, 2, 1, 3, 4, 2, 8, 8, 2), (1, 2, 2, 0, 4, 2, 8, 8, 2)]


def _memory(shape, dtype, device, *, capacity=3, padding=True):
    """q (B, H, T, D) transposed from (B, T, H, D); blocks narrowed along NB from a buffer of
    NB + capacity blocks starting at block 1 (as a block memory grows and evicts); padding in the
    first block of the last batch element and in one whole block."""
    B, H, Hk, T, NB, S, D, Dv, k = shape
    q = rand(B, T, H, D, dtype=dtype, device=device).transpose(1, 2)
    keys = rand(B, Hk, NB + capacity, S, D, dtype=dtype, device=device).narrow(2, 1, NB)
    values = rand(B, Hk, NB + capacity, S, Dv, dtype=dtype, device=device).narrow(2, 1, NB)
    valid = None
    if padding and B:
        valid = torch.ones(B, NB, S, dtype=torch.bool, device=device)
        valid[-1, 0, : max(1, S // 2)] = False
        if NB > 2:
            valid[0, 2] = False
    return q, keys, values, valid


@pytest.mark.parametrize("backend,device", fused_backend_params("block_read"))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_block_read_matches_reference(backend, device, shape, dtype):
    skip_unless_served(backend, dtype)
    torch.manual_seed(0)
    q, keys, values, valid = _memory(shape, dtype, device)
    B, H, Hk, T, NB, S, D, Dv, k = shape
    indices = torch.randint(0, NB, (B, Hk, k), device=device)            # repeats included
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, keys, values)]
    out, lse = l2m.block_read(*leaves, indices, block_valid=valid, scale=0.4, backend=backend)
    assert out.dtype == dtype and lse.dtype == lse_dtype(dtype) and out.shape == (B, H, T, Dv)
    dout, dlse = rand(*out.shape, dtype=dtype, device=device), rand(*lse.shape, device=device)
    dlse = dlse.to(lse.dtype)
    grads = torch.autograd.grad((out, lse), leaves, (dout, dlse), allow_unused=True)
    ref_leaves = [t.detach().to(torch.float64).cpu().requires_grad_(True) for t in (q, keys, values)]
    ref_out, ref_lse = block_read_ref(*ref_leaves, indices.cpu(), None if valid is None else valid.cpu(), 0.4)
    ref_grads = torch.autograd.grad((ref_out, ref_lse), ref_leaves, (dout.cpu().double(), dlse.cpu().double()),
                                    allow_unused=True)
    assert_close("out", out, ref_out, dtype)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isneginf(lse).cpu(), ~finite)
    assert_close("lse", lse.cpu()[finite], ref_lse[finite], dtype)
    for name, g, rg, x in zip(("dq", "dblock_keys", "dblock_values"), grads, ref_grads, leaves):
        assert g.dtype == x.dtype and g.shape == x.shape
        assert_close(name, g, rg, dtype)


@pytest.mark.parametrize("backend,device", fused_backend_params("block_topk"))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("R", ["one", "all"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_block_topk_matches_reference(backend, device, shape, R, dtype):
    skip_unless_served(backend, dtype)
    torch.manual_seed(1)
    q, keys, _, valid = _memory(shape, dtype, device)
    B, H, Hk, T, NB, S, D, Dv, k = shape
    if R == "one":
        reprs, repr_valid = keys.float().mean(3, keepdim=True).to(dtype), None if valid is None else valid.any(-1, True)
    else:
        reprs, repr_valid = keys, valid
    indices, scores = l2m.block_topk(q, reprs, k, repr_valid=repr_valid, scale=0.4, backend=backend)
    assert indices.shape == (B, Hk, k) and indices.dtype == torch.int64
    assert scores.shape == (B, Hk, NB) and scores.dtype == lse_dtype(dtype)
    want = block_scores_ref(q.double().cpu(), reprs.double().cpu(), None if repr_valid is None else repr_valid.cpu(),
                            0.4)
    assert torch.equal(torch.isneginf(scores).cpu(), torch.isneginf(want))
    finite = torch.isfinite(want)
    assert_close("scores", scores.cpu()[finite], want[finite], dtype)
    assert torch.equal(indices.cpu(), select_blocks(scores.cpu(), k))   # the documented order, own scores


@pytest.mark.parametrize("backend,device", fused_backend_params("block_topk"))
def test_block_topk_ties_go_to_the_smaller_block_and_nan_first(backend, device):
    q = torch.ones(1, 2, 3, 4, device=device)
    reprs = torch.ones(1, 1, 6, 1, 4, device=device)
    reprs[0, 0, 4] = 2.0                                                 # the best block
    assert l2m.block_topk(q, reprs, 3, backend=backend).indices.tolist() == [[[0, 1, 4]]]
    reprs[0, 0, 5, 0, 1] = math.nan                                      # NaN ranks first
    assert l2m.block_topk(q, reprs, 2, backend=backend).indices.tolist() == [[[4, 5]]]
    valid = torch.ones(1, 6, 1, dtype=torch.bool, device=device)
    valid[0, :2] = False                                                 # no representative: -inf, last
    indices, scores = l2m.block_topk(q, reprs, 5, repr_valid=valid, backend=backend)
    assert indices.tolist() == [[[0, 2, 3, 4, 5]]] and torch.isneginf(scores[0, 0, :2]).all()


@pytest.mark.parametrize("backend,device", fused_backend_params("block_read"))
def test_invalid_tokens_never_reach_the_result(backend, device):
    q, keys, values, valid = _memory((1, 2, 1, 4, 3, 4, 8, 8, 3), torch.float32, device)
    valid[0, 1, 1:3] = False
    indices = torch.tensor([[[0, 1, 2]]], device=device)
    out, lse = l2m.block_read(q, keys, values, indices, block_valid=valid, backend=backend)
    keys, values = keys.clone(), values.clone()
    keys[0, 0, 1, 1] = math.nan
    values[0, 0, 1, 2] = math.inf
    out2, lse2 = l2m.block_read(q, keys, values, indices, block_valid=valid, backend=backend)
    assert torch.equal(out, out2) and torch.equal(lse, lse2)


@pytest.mark.parametrize("backend,device", fused_backend_params("block_read"))
def test_out_of_range_block_ids_are_refused_before_any_kernel_runs(backend, device):
    q, keys, values, _ = _memory((1, 2, 1, 4, 3, 4, 8, 8, 3), torch.float32, device, padding=False)
    for bad in (3, -1):
        with pytest.raises(IndexError, match="indices"):
            l2m.block_read(q, keys, values, torch.tensor([[[0, bad]]], device=device), backend=backend)
    with pytest.raises(ValueError, match="k"):
        l2m.block_topk(q, keys, 4, backend=backend)


def test_training_step_under_torch_compile_matches_eager():
    """q, keys and values as a model produces them, through block_topk and block_read and a merge,
    compiled without graph breaks: the same outputs and gradients as eager."""
    torch.manual_seed(3)
    q, keys, values, valid = _memory((1, 4, 2, 6, 8, 4, 16, 16, 3), torch.float32, "cpu")

    def step(q, keys, values):
        indices = l2m.block_topk(q, keys, 3, repr_valid=valid).indices
        out, lse = l2m.block_read(q, keys, values, indices, block_valid=valid)
        out, _ = l2m.merge_attention(out, lse, torch.zeros_like(out), torch.full_like(lse, -math.inf))
        return out

    compiled = torch.compile(step, fullgraph=True)
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, keys, values)]
    eager = step(*leaves)
    eager_grads = torch.autograd.grad(eager.square().sum(), leaves)
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, keys, values)]
    out = compiled(*leaves)
    grads = torch.autograd.grad(out.square().sum(), leaves)
    torch.testing.assert_close(out, eager)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e)


def test_autocast_promotes_to_the_memory_dtype():
    q, keys, values, valid = _memory((1, 2, 1, 4, 3, 4, 8, 8, 3), torch.float32, "cpu")
    indices = torch.tensor([[[0, 2]]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, lse = l2m.block_read(q.bfloat16(), keys, values, indices, block_valid=valid)
        selection = l2m.block_topk(q.bfloat16(), keys, 2, repr_valid=valid)
    assert out.dtype == torch.float32 and selection.scores.dtype == torch.float32
    assert_close("out", out, block_read_ref(q.bfloat16().double(), keys.double(), values.double(), indices, valid)[0],
                 torch.bfloat16)


def test_calls_from_several_threads_give_the_single_thread_results():
    """Forward and backward from 4 Python threads at once (each kernel parallel inside): the same bits
    as one call at a time."""
    import threading

    torch.manual_seed(4)
    cases = []
    for seed in range(4):
        q, keys, values, valid = _memory((1, 4, 2, 9, 12, 8, 16, 8, 4), torch.float32, "cpu")
        indices = torch.randint(0, 12, (1, 2, 4))
        cases.append((q, keys, values, valid, indices))

    def run(q, keys, values, valid, indices):
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, keys, values)]
        selection = l2m.block_topk(leaves[0], leaves[1], 4, repr_valid=valid)
        out, lse = l2m.block_read(*leaves, indices, block_valid=valid)
        grads = torch.autograd.grad((out.square().sum() + lse.sum()), leaves)
        return (selection.indices, selection.scores, out, lse, *grads)

    alone = [run(*case) for case in cases]
    together = [None] * len(cases)

    def worker(i):
        together[i] = run(*cases[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(cases))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for one, other in zip(alone, together):
        assert all(torch.equal(a, b) for a, b in zip(one, other))
