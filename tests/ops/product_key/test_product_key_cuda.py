"""The CUDA product-key read kernels of ``l2m_kernels._C_cuda`` (product_key_fwd /
product_key_bwd / product_key_segment_sum, with the scratch and plans the cuda launchers make:
``cuda_product_key_fwd`` / ``cuda_product_key_bwd``), called directly, against the float64
reference (``l2m_kernels/ops/product_key/reference.py``).

float32, float16 and bfloat16 with outputs pre-filled with NaN (indices with a sentinel): the
selection must be a valid top-k of the float64 candidate scores (``assert_valid_topk`` over
``product_key_scores``), and exactly the reference's on integer-valued data (ties everywhere) and
on NaN query rows; out / weights / lse and dq / dsubkeys / dvalues by relative RMS error against
the float64 reference at the kernel's selection (dense atomic, dense deterministic and bitwise
repeatable, sparse per-entry rows), over odd sizes (n_sub 7/33, T 7, Dk 2/14/130/512, Dv
1/7/129/300/520), k = k_sub ** 2, k_sub = n_sub, k = 1, sum_heads both ways, empty batches, bad
calls and out-of-range indices in the backward.

Shared set-up, and the CPU kernels standing in without a CUDA device: ``tests/ops/_cuda.py``.
"""
from __future__ import annotations

import pytest
import torch

from l2m_kernels.ops.product_key.function import cuda_product_key_bwd, cuda_product_key_fwd
from l2m_kernels.ops.product_key.reference import product_key_gather, product_key_select
from l2m_kernels.testing import (assert_close, assert_valid_topk, bits_equal, nan_filled,
                                 product_key_scores)
from .._cuda import (INDEX_SENTINEL, NAN, assert_bad_calls_listed, bad_call_test,
                     cpu_kernels_test, cuda_kernel_test)

# (B, H, T, Dk, n_sub, Dv, k, k_sub, sum_heads, special)
# special: None (random data), "int" (integer-valued q / subkeys and scale 0.25: exact scores with
# many ties), "nan" (NaN query rows).
CASES = [
    (2, 2, 7, 14, 7, 7, 5, 3, False, None),
    (2, 2, 7, 14, 7, 7, 9, 3, True, None),           # k = k_sub ** 2
    (1, 3, 7, 2, 7, 1, 1, 7, False, None),           # k = 1, k_sub = n_sub, Dk 2, Dv 1
    (1, 3, 7, 2, 7, 1, 1, 7, True, None),
    (2, 2, 7, 130, 33, 129, 32, 33, True, None),     # k_sub = n_sub = 33, Dh 65, Dv 129
    (1, 2, 7, 130, 33, 129, 256, 16, False, None),   # k = 256 = k_sub ** 2
    (2, 2, 9, 64, 300, 64, 100, 200, False, None),   # K_PAD 128, KS_PAD 256, many tiles
    (1, 1, 5, 512, 256, 16, 256, 256, False, None),  # the largest Dk, k, k_sub (= n_sub)
    (1, 2, 5, 8, 16, 300, 4, 4, False, None),        # Dv > one chunk
    (1, 2, 4, 8, 16, 520, 4, 4, True, None),         # Dv multiple of 8, 3 chunks
    (2, 2, 7, 16, 33, 8, 16, 8, False, "int"),
    (2, 2, 7, 16, 33, 8, 64, 33, True, "int"),       # exact ties, k_sub = n_sub
    (2, 3, 7, 6, 7, 7, 49, 7, False, "int"),         # every slot, ties everywhere
    (1, 2, 6, 16, 20, 8, 8, 4, False, "nan"),
    (1, 2, 6, 16, 20, 8, 8, 4, True, "nan"),
    (0, 2, 5, 16, 7, 8, 4, 3, False, None),          # empty batch
    (0, 2, 5, 16, 7, 8, 4, 3, True, None),
    (2, 2, 0, 16, 7, 8, 4, 3, True, None),           # T = 0 (sum_heads)
    (2, 2, 0, 16, 7, 8, 4, 3, False, None),
]


def _case_id(case):
    B, H, T, Dk, n_sub, Dv, k, k_sub, sum_heads, special = case
    return (f"B{B}H{H}T{T}Dk{Dk}n{n_sub}Dv{Dv}k{k}ks{k_sub}{'-sum' if sum_heads else ''}"
            f"{'-' + special if special else ''}")


def product_key_inputs(case, dtype, device):
    """q (B, H, T, Dk), subkeys (H, 2, n_sub, Dk / 2), values (n_sub ** 2, Dv) in dtype, the
    scale, and nan_rows (B, H, T) bool: the query rows set to NaN."""
    B, H, T, Dk, n_sub, Dv, k, k_sub, sum_heads, special = case
    if special == "int":
        q = torch.randint(-2, 3, (B, H, T, Dk), device=device).to(dtype)
        subkeys = torch.randint(-2, 3, (H, 2, n_sub, Dk // 2), device=device).to(dtype)
        scale = 0.25
    else:
        q = torch.randn(B, H, T, Dk, device=device).to(dtype)
        subkeys = torch.randn(H, 2, n_sub, Dk // 2, device=device).to(dtype)
        scale = Dk ** -0.5 if Dk else 1.0
    values = torch.randn(n_sub * n_sub, Dv, device=device).to(dtype)
    nan_rows = torch.zeros(B, H, T, dtype=torch.bool, device=device)
    if special == "nan" and B * H * T:
        nan_rows[0, 0, min(1, T - 1)] = True
        nan_rows[-1, -1, T - 1] = True
        q[nan_rows] = NAN
    return q, subkeys, values, scale, nan_rows


def product_key_expected(q, subkeys, values, indices, scale, sum_heads, dout, dweights, dlse):
    """The float64 reference at the given selection (out, weights, lse, dq, dsubkeys, dvalues) and
    the same computed at the input dtype (the baselines)."""
    results = []
    for cast in (torch.Tensor.double, torch.Tensor.clone):
        leaves = [cast(t).requires_grad_() for t in (q, subkeys, values)]
        outputs = product_key_gather(*leaves, indices, scale, sum_heads=sum_heads)
        cotangents = [cast(c) for c in (dout, dweights, dlse)]
        grads = torch.autograd.grad(outputs, leaves, cotangents, allow_unused=True)
        grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves)]
        results.append(([o.detach() for o in outputs], grads))
    return results


def check_product_key(ext, device, case, dtype):
    B, H, T, Dk, n_sub, Dv, k, k_sub, sum_heads, special = case
    q, subkeys, values, scale, nan_rows = product_key_inputs(case, dtype, device)
    out_shape = (B, T, Dv) if sum_heads else (B, H, T, Dv)
    out = nan_filled(out_shape, dtype, device)
    indices = torch.full((B, H, T, k), INDEX_SENTINEL, dtype=torch.int64, device=device)
    weights = nan_filled((B, H, T, k), torch.float32, device)
    lse = nan_filled((B, H, T), torch.float32, device)
    cuda_product_key_fwd(ext, q, subkeys, values, k, k_sub, scale, sum_heads, out, indices,
                         weights, lse)

    if B * H * T:
        scores, selectable, candidates = product_key_scores(q, subkeys, k_sub, scale)
        assert_valid_topk(indices, scores, selectable=selectable, competitors=candidates,
                          name="indices")
        ref_indices = product_key_select(q, subkeys, k, k_sub, scale)
        exact_rows = torch.ones_like(nan_rows) if special == "int" else nan_rows
        bad = (indices != ref_indices).any(-1) & exact_rows
        assert not bad.any(), (f"selection differs from the reference on {int(bad.sum())} exact "
                               "row(s)")

    dout = torch.randn(out_shape, device=device).to(dtype)
    dweights = torch.randn(B, H, T, k, device=device)
    dlse = torch.randn(B, H, T, device=device)
    (ref_outputs, grads64), (low_outputs, grads_low) = product_key_expected(
        q, subkeys, values, indices, scale, sum_heads, dout, dweights, dlse)
    for name, actual, expected, low in zip(("out", "weights", "lse"), (out, weights, lse),
                                           ref_outputs, low_outputs):
        assert_close(name, actual, expected, dtype, baseline=low,
                     scale=1.0 if name == "lse" else 0.0)
    value_rows_expected = (weights.unsqueeze(-1) * (dout.unsqueeze(1) if sum_heads else dout)
                           .unsqueeze(-2).float()).reshape(-1, Dv).to(dtype)

    def run_bwd(sparse, deterministic):
        dq = nan_filled(q.shape, dtype, device)
        dsub = nan_filled(subkeys.shape, dtype, device)
        dval = nan_filled((B * H * T * k, Dv) if sparse else values.shape, dtype, device)
        cuda_product_key_bwd(ext, dout, dweights, dlse, q, subkeys, values, indices, weights,
                             scale, sum_heads, sparse, deterministic, dq, dsub, dval)
        return dq, dsub, dval

    finite_rows = ~nan_rows
    for sparse in (False, True):
        for deterministic in (False, True):
            mode = f"bwd sparse={sparse} det={deterministic}"
            dq, dsub, dval = run_bwd(sparse, deterministic)
            if deterministic:
                for name, a, b in zip(("dq", "dsubkeys", "dvalues"), (dq, dsub, dval),
                                      run_bwd(sparse, deterministic)):
                    assert bits_equal(a, b), f"{mode} {name}: not bitwise repeatable"
            if special == "nan":
                # The reference's matmul backward spreads a NaN query into every sub-key gradient
                # (0 * NaN), the kernel only into the selected ones: compare dq of the finite rows.
                assert_close(f"{mode} dq (finite rows)", dq[finite_rows],
                             grads64[0][finite_rows], dtype, baseline=grads_low[0][finite_rows])
                continue
            assert_close(f"{mode} dq", dq, grads64[0], dtype, baseline=grads_low[0])
            assert_close(f"{mode} dsubkeys", dsub, grads64[1], dtype, baseline=grads_low[1])
            if sparse:
                assert_close(f"{mode} dvalues rows", dval, value_rows_expected, dtype)
            else:
                assert_close(f"{mode} dvalues", dval, grads64[2], dtype, baseline=grads_low[2])


def _bad_calls(device):
    """Bad product_key calls through the cuda launcher and the exception type each raises (they
    never launch)."""
    B, H, T, Dk, n_sub, Dv, k, k_sub = 1, 2, 3, 8, 5, 4, 4, 3
    q = torch.randn(B, H, T, Dk, device=device)
    subkeys = torch.randn(H, 2, n_sub, Dk // 2, device=device)
    values = torch.randn(n_sub * n_sub, Dv, device=device)

    def outs(k_=k, shape=(B, H, T), Dv_=Dv):
        return (torch.empty(*shape, Dv_, device=device),
                torch.empty(*shape, k_, dtype=torch.int64, device=device),
                torch.empty(*shape, k_, device=device), torch.empty(*shape, device=device))

    def fwd(*args):
        return lambda ext: cuda_product_key_fwd(ext, *args)

    n_big = 300
    return {
        "k > k_sub ** 2": (ValueError, fwd(q, subkeys, values, 10, k_sub, 1.0, False, *outs(10))),
        "k_sub > n_sub": (ValueError, fwd(q, subkeys, values, k, 6, 1.0, False, *outs())),
        "wrong subkeys shape": (ValueError, fwd(q, subkeys[:, :, :4].contiguous(), values, k,
                                                k_sub, 1.0, False, *outs())),
        "wrong values shape": (ValueError, fwd(q, subkeys, values[:-1], k, k_sub, 1.0, False,
                                               *outs())),
        "float64": (TypeError, fwd(q.double(), subkeys.double(), values.double(), k, k_sub, 1.0,
                                   False, *outs())),
        "cpu tensor": (ValueError, fwd(q.cpu(), subkeys, values, k, k_sub, 1.0, False, *outs())),
        "Dk > 512": (NotImplementedError, fwd(
            torch.randn(1, 1, 2, 514, device=device), torch.randn(1, 2, 4, 257, device=device),
            torch.randn(16, 4, device=device), 2, 2, 1.0, False, *outs(2, (1, 1, 2), 4))),
        "k_sub > 256": (NotImplementedError, fwd(
            torch.randn(1, 1, 2, 4, device=device), torch.randn(1, 2, n_big, 2, device=device),
            torch.randn(n_big * n_big, 1, device=device), 4, 257, 1.0, False,
            *outs(4, (1, 1, 2), 1))),
    }


test_product_key_cuda = cuda_kernel_test(check_product_key, CASES, _case_id)
test_product_key_bad_call_raises = bad_call_test(_bad_calls)


@pytest.mark.gpu
@pytest.mark.parametrize("deterministic", [False, True])
def test_product_key_bwd_skips_out_of_range_indices(cuda_ext, deterministic):
    """Out-of-range indices in the backward are skipped, never read or written out of bounds."""
    B, H, T, Dk, n_sub, Dv, k, k_sub = 1, 2, 3, 8, 5, 4, 4, 3
    q = torch.randn(B, H, T, Dk, device="cuda")
    subkeys = torch.randn(H, 2, n_sub, Dk // 2, device="cuda")
    values = torch.randn(n_sub * n_sub, Dv, device="cuda")
    out, indices = torch.empty(B, H, T, Dv, device="cuda"), torch.empty(B, H, T, k, dtype=torch.int64, device="cuda")
    weights, lse = torch.empty(B, H, T, k, device="cuda"), torch.empty(B, H, T, device="cuda")
    cuda_product_key_fwd(cuda_ext, q, subkeys, values, k, k_sub, 1.0, False, out, indices, weights,
                         lse)
    bad = indices.clone()
    bad[0, 0, 0, 0] = n_sub * n_sub + 100
    bad[0, 1, 2, 1] = -5
    dq, dsub, dval = torch.empty_like(q), torch.empty_like(subkeys), torch.empty_like(values)
    cuda_product_key_bwd(cuda_ext, torch.randn_like(out), torch.randn_like(weights),
                         torch.randn_like(lse), q, subkeys, values, bad, weights, 1.0, False, False,
                         deterministic, dq, dsub, dval)
    torch.cuda.synchronize()
    assert torch.isfinite(dq).all() and torch.isfinite(dsub).all() and torch.isfinite(dval).all()


def test_product_key_cases_and_reference_side_on_cpu():
    """What the gpu tests run before the kernel, here on CPU tensors (float32): every case's
    inputs and the reference side (the reference's selection passes assert_valid_topk; on
    integer data its scores tie)."""
    assert len({_case_id(case) for case in CASES}) == len(CASES)
    for case in CASES:
        B, H, T, Dk, n_sub, Dv, k, k_sub, sum_heads, special = case
        q, subkeys, values, scale, nan_rows = product_key_inputs(case, torch.float32, "cpu")
        assert q.shape == (B, H, T, Dk) and subkeys.shape == (H, 2, n_sub, Dk // 2)
        assert values.shape == (n_sub * n_sub, Dv) and 1 <= k <= k_sub ** 2 and k_sub <= n_sub
        assert bool(nan_rows.any()) == (special == "nan") and q[nan_rows].isnan().all()
        if B * H * T == 0 or B * H * T * n_sub * n_sub > 100_000:  # seconds on a CPU
            continue
        indices = product_key_select(q, subkeys, k, k_sub, scale)
        scores, selectable, candidates = product_key_scores(q, subkeys, k_sub, scale)
        assert (candidates.sum(-1) == k_sub * k_sub).all()
        assert_valid_topk(indices, scores, selectable=selectable, competitors=candidates)
        if special == "int":
            top = scores.sort(-1, descending=True).values
            assert (top[..., :-1] == top[..., 1:]).any()
        shape = (B, T, Dv) if sum_heads else (B, H, T, Dv)
        cotangents = (torch.randn(shape), torch.randn(B, H, T, k), torch.randn(B, H, T))
        (outputs, grads), (low_outputs, low_grads) = product_key_expected(
            q, subkeys, values, indices, scale, sum_heads, *cotangents)
        assert outputs[0].shape == shape and grads[2].shape == values.shape
        assert [g.dtype for g in low_grads] == [torch.float32] * 3
    assert_bad_calls_listed(_bad_calls)


# A few cases whose bodies also run on CPU tensors with the CPU kernels in the CUDA kernels' place:
# odd sizes, k = k_sub ** 2 summed over heads, Dv > one chunk, integer data, NaN rows, empty batch.
CPU_CASES = [CASES[i] for i in (0, 1, 8, 10, 13, 15)]


test_product_key_body_runs_on_cpu_kernels = cpu_kernels_test(check_product_key, CPU_CASES,
                                                             _case_id)
