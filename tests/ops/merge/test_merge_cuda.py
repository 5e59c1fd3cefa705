"""The CUDA merge kernels of ``l2m_kernels._C_cuda``, called directly, against the float64
reference (``l2m_kernels/ops/merge/reference.py``).

merge_attention_fwd / _bwd and gated_merge_fwd / _bwd in float32, float16 and bfloat16 over odd and
large D (1 .. 4096), empty and single rows, misaligned row starts (all shifted alike: the peeled
vector path; shifted differently: the scalar path), -inf and NaN rows, extreme gates, more rows
than resident threads (the grid-stride loop), outputs pre-filled with NaN, and bad calls. Each
result is judged by relative RMS error at the dtype's tolerance, or within twice the error of the
same reference computed by PyTorch at the input dtype (``assert_close(baseline=...)``).
``huge``: one merge launch over 2**31 + 17 rows (int64 rows and offsets, ~52 GB).

Shared set-up, and the CPU kernels standing in without a CUDA device: ``tests/ops/_cuda.py``.
"""
from __future__ import annotations

import math

import pytest
import torch

from l2m_kernels.ops.merge.reference import gated_merge_ref, merge_attention_ref
from l2m_kernels.testing import assert_close, nan_filled, placed
from .._cuda import NAN, NEG_INF, cpu_kernels_test, cuda_kernel_test

HEAD_DIMS = (1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 96, 127, 128, 129, 255,
             256, 257, 512, 1000, 1024, 4096)
ROW_COUNTS = (0, 1, 2, 6, 37, 300, 2049)
# Misalignment (elements) of the three (R, D) tensors of a call: all aligned; all shifted alike
# (vector path with peeled head and tail); shifted differently (scalar path).
MISALIGNS = ((0, 0, 0), (1, 1, 1), (0, 1, 3), (3, 3, 3))


def merge_cases():
    """(rows, head_dim, misalign, special_rows): every D and row count, misaligned starts for 6 and
    37 rows, special rows (-inf, NaN, dominant side / extreme gate) in the aligned calls of 6 rows
    or more; then more rows than resident threads."""
    cases = []
    for head_dim in HEAD_DIMS:
        for rows in ROW_COUNTS:
            for misalign in MISALIGNS if rows in (6, 37) else ((0, 0, 0),):
                cases.append((rows, head_dim, misalign, rows >= 6 and misalign == (0, 0, 0)))
    cases += [(300_000, 5, (0, 0, 0), False), (70_000, 64, (0, 0, 0), True)]
    return cases


CASES = merge_cases()


def _case_id(case):
    rows, head_dim, misalign, special = case
    return f"R{rows}-D{head_dim}-m{''.join(map(str, misalign))}{'-special' if special else ''}"


def merge_attention_inputs(rows, head_dim, dtype, special_rows, device):
    """out_a, out_b, dout (R, D) dtype; lse_a, lse_b, dlse (R,) float32. Special rows (R >= 6):
    0 side a empty, 1 side b empty, 2 both empty, 3 one side dominates, 4 and 5 NaN lse."""
    out_a = torch.randn(rows, head_dim, device=device).to(dtype)
    out_b = torch.randn(rows, head_dim, device=device).to(dtype)
    lse_a = torch.randn(rows, device=device) * 4
    lse_b = torch.randn(rows, device=device) * 4
    if special_rows:
        lse_a[0] = NEG_INF
        lse_b[1] = NEG_INF
        lse_a[2] = NEG_INF
        lse_b[2] = NEG_INF
        lse_a[3], lse_b[3] = 80.0, -80.0
        lse_a[4] = NAN
        lse_b[5] = NAN
    dout = torch.randn(rows, head_dim, device=device).to(dtype)
    dlse = torch.randn(rows, device=device)
    return out_a, lse_a, out_b, lse_b, dout, dlse


def gated_merge_inputs(rows, head_dim, dtype, special_rows, device):
    """local, memory, dout (R, D) and gate (R,) in dtype. Special rows (R >= 4): gates 100, -100,
    0 and NaN."""
    local = torch.randn(rows, head_dim, device=device).to(dtype)
    memory = torch.randn(rows, head_dim, device=device).to(dtype)
    gate = (torch.randn(rows, device=device) * 3).to(dtype)
    if special_rows:
        gate[0], gate[1], gate[2], gate[3] = 100.0, -100.0, 0.0, NAN
    dout = torch.randn(rows, head_dim, device=device).to(dtype)
    return local, memory, gate, dout


def merge_attention_expected(out_a, lse_a, out_b, lse_b, dout, dlse):
    """The float64 reference (out, lse, gradients) and, as the baseline, the same computed by
    PyTorch at the input dtype. Gradients: d_out_a, d_lse_a, d_out_b, d_lse_b."""
    leaves = [t.double().requires_grad_() for t in (out_a, lse_a, out_b, lse_b)]
    out_ref, lse_ref = merge_attention_ref(*leaves)
    grads = [torch.zeros_like(t) for t in leaves]
    low_grads = [torch.zeros_like(t) for t in (out_a, lse_a, out_b, lse_b)]
    if out_a.shape[0]:
        grads = torch.autograd.grad((out_ref, lse_ref), leaves, (dout.double(), dlse.double()))
        low_leaves = [t.clone().requires_grad_() for t in (out_a, lse_a, out_b, lse_b)]
        low_grads = torch.autograd.grad(merge_attention_ref(*low_leaves), low_leaves, (dout, dlse))
    return out_ref.detach(), lse_ref.detach(), grads, low_grads


def gated_merge_expected(local, memory, gate, dout):
    """The float64 reference (out, d_local, d_mem, d_gate) and the input-dtype baselines."""
    leaves = [t.double().requires_grad_() for t in (local, memory, gate)]
    out_ref = gated_merge_ref(leaves[0], leaves[1], leaves[2].unsqueeze(-1))
    grads = [torch.zeros_like(t) for t in leaves]
    low_grads = [torch.zeros_like(t) for t in (local, memory, gate)]
    if local.shape[0]:
        grads = torch.autograd.grad(out_ref, leaves, dout.double())
        low_leaves = [t.clone().requires_grad_() for t in (local, memory, gate)]
        low_out = gated_merge_ref(low_leaves[0], low_leaves[1], low_leaves[2].unsqueeze(-1))
        low_grads = torch.autograd.grad(low_out, low_leaves, dout)
    return out_ref.detach(), grads, low_grads


def check_merge_attention(ext, device, case, dtype):
    rows, head_dim, misalign, special = case
    out_a, lse_a, out_b, lse_b, dout, dlse = merge_attention_inputs(rows, head_dim, dtype, special,
                                                                    device)
    ma, mb, mo = misalign
    out_a_k, out_b_k = placed(out_a, ma), placed(out_b, mb)
    out = nan_filled((rows, head_dim), dtype, device, misalign=mo)
    lse = nan_filled((rows,), torch.float32, device)
    ext.merge_attention_fwd(out_a_k, lse_a, out_b_k, lse_b, out, lse)
    out_ref, lse_ref, grads_ref, grads_low = merge_attention_expected(out_a, lse_a, out_b, lse_b,
                                                                      dout, dlse)
    assert_close("out", out, out_ref, dtype)
    assert_close("lse", lse, lse_ref, torch.float32)
    if special:
        assert (out[2] == 0).all() and lse[2].item() == NEG_INF, "both -inf row: not out 0, lse -inf"
        assert out[4].isnan().all() and lse[4].isnan() and out[5].isnan().all(), "NaN row not NaN"
    finite_rows = lse_ref.isfinite() | lse_ref.isneginf()
    assert torch.isfinite(out[finite_rows]).all(), "non-finite output in a finite row"

    # The backward gets the kernel's own forward lse, as in autograd.
    d_out_a = nan_filled((rows, head_dim), dtype, device, misalign=ma)
    d_out_b = nan_filled((rows, head_dim), dtype, device, misalign=mb)
    d_lse_a = nan_filled((rows,), torch.float32, device)
    d_lse_b = nan_filled((rows,), torch.float32, device)
    ext.merge_attention_bwd(placed(dout, mo), dlse, out_a_k, lse_a, out_b_k, lse_b, lse,
                            d_out_a, d_lse_a, d_out_b, d_lse_b)
    grads = {"d_out_a": (d_out_a, dtype), "d_lse_a": (d_lse_a, torch.float32),
             "d_out_b": (d_out_b, dtype), "d_lse_b": (d_lse_b, torch.float32)}
    keep = torch.ones(rows, dtype=torch.bool, device=device)
    if special:
        keep[4:6] = False  # NaN rows: the reference's gradient NaN pattern is its own affair
        for name, (actual, _) in grads.items():
            assert actual[4:6].isnan().all(), f"{name} of a NaN row is not NaN"
            assert (actual[2] == 0).all(), f"{name} of the both -inf row is not 0"
    # d_lse = w * (dlse + ...) can cancel to ~0 in a row: judged on dlse's scale.
    dlse_scale = dlse[keep].double().square().mean().sqrt().item() if rows else 0.0
    for (name, (actual, check_dtype)), expected, low in zip(grads.items(), grads_ref, grads_low):
        assert_close(name, actual[keep], expected[keep], check_dtype, baseline=low[keep],
                     scale=dlse_scale if "lse" in name else 0.0)


def check_gated_merge(ext, device, case, dtype):
    rows, head_dim, misalign, special = case
    local, memory, gate, dout = gated_merge_inputs(rows, head_dim, dtype, special, device)
    ml, mm, mo = misalign
    local_k, memory_k = placed(local, ml), placed(memory, mm)
    out = nan_filled((rows, head_dim), dtype, device, misalign=mo)
    ext.gated_merge_fwd(local_k, memory_k, gate, out)
    out_ref, grads_ref, grads_low = gated_merge_expected(local, memory, gate, dout)
    assert_close("out", out, out_ref, dtype)

    d_local = nan_filled((rows, head_dim), dtype, device, misalign=ml)
    d_mem = nan_filled((rows, head_dim), dtype, device, misalign=mm)
    d_gate = nan_filled((rows,), torch.float32, device)
    ext.gated_merge_bwd(placed(dout, mo), local_k, memory_k, gate, d_local, d_mem, d_gate)
    assert_close("d_local", d_local, grads_ref[0], dtype, baseline=grads_low[0])
    assert_close("d_mem", d_mem, grads_ref[1], dtype, baseline=grads_low[1])
    # d_gate is float32 from the same (rounded) inputs the reference sees; PyTorch's own d_gate
    # comes back in the gate's dtype, so it is no baseline for half types.
    assert_close("d_gate", d_gate, grads_ref[2], torch.float32,
                 baseline=grads_low[2] if dtype == torch.float32 else None)


test_merge_attention_cuda = cuda_kernel_test(check_merge_attention, CASES, _case_id)
test_gated_merge_cuda = cuda_kernel_test(check_gated_merge, CASES, _case_id)


def _bad_calls(x, lse):
    return {
        "cpu tensor": lambda ext: ext.gated_merge_fwd(x.cpu(), x.cpu(), lse.cpu(), x.cpu()),
        "float64": lambda ext: ext.gated_merge_fwd(x.double(), x.double(), lse.double(),
                                                   x.double()),
        "shape": lambda ext: ext.merge_attention_fwd(x, lse, x[:3], lse, torch.empty_like(x), lse),
        "non-contiguous": lambda ext: ext.gated_merge_fwd(x.t(), x.t(),
                                                          torch.randn(8, device=x.device),
                                                          torch.empty(8, 4, device=x.device)),
        "lse dtype": lambda ext: ext.merge_attention_fwd(x.half(), lse.half(), x.half(),
                                                         lse.half(), x.half(), lse.half()),
    }


BAD_CALLS = list(_bad_calls(torch.empty(4, 8), torch.empty(4)))


@pytest.mark.gpu
@pytest.mark.parametrize("name", BAD_CALLS)
def test_merge_bad_call_raises(cuda_ext, name):
    call = _bad_calls(torch.randn(4, 8, device="cuda"), torch.randn(4, device="cuda"))[name]
    with pytest.raises((RuntimeError, ValueError, TypeError)):
        call(cuda_ext)


@pytest.mark.gpu
@pytest.mark.huge
def test_merge_attention_over_2_31_rows(cuda_ext):
    """One merge_attention_fwd over 2**31 + 17 rows (bfloat16, D = 2): int64 rows and offsets."""
    rows, head_dim = (1 << 31) + 17, 2
    out_a = torch.ones(rows, head_dim, dtype=torch.bfloat16, device="cuda")
    out_b = torch.full((rows, head_dim), 3.0, dtype=torch.bfloat16, device="cuda")
    lse_a = torch.zeros(rows, device="cuda")
    lse_b = torch.zeros(rows, device="cuda")
    lse_b[-5:] = NEG_INF
    out = torch.full_like(out_a, NAN)
    lse = torch.full_like(lse_a, NAN)
    cuda_ext.merge_attention_fwd(out_a, lse_a, out_b, lse_b, out, lse)
    del out_a, out_b, lse_a, lse_b  # room for the comparisons' temporaries
    torch.cuda.empty_cache()
    # Equal lse: out = (1 + 3) / 2 = 2, lse = log 2; the last 5 rows: out = 1, lse = 0.
    assert bool((out[:-5] == 2).all()), "wrong values in the body"
    assert bool((out[-5:] == 1).all()) and bool((lse[-5:] == 0).all()), "wrong values in the last rows"
    assert bool(((lse[:-5] - math.log(2)).abs() < 1e-6).all()), "wrong lse"


def test_merge_cases_and_reference_side_on_cpu():
    """What the gpu tests run before the kernel, here on CPU tensors: the case matrix, every
    input generator, and the reference side they judge by (small cases)."""
    assert len(CASES) == len(HEAD_DIMS) * (len(ROW_COUNTS) + 2 * (len(MISALIGNS) - 1)) + 2
    assert len({_case_id(case) for case in CASES}) == len(CASES)
    for rows, head_dim, misalign, special in CASES:
        if rows * head_dim > 40_000:
            continue
        for dtype in (torch.float32, torch.bfloat16):
            out_a, lse_a, out_b, lse_b, dout, dlse = merge_attention_inputs(rows, head_dim, dtype,
                                                                            special, "cpu")
            assert out_a.shape == out_b.shape == dout.shape == (rows, head_dim)
            assert out_a.dtype == dtype and lse_a.dtype == torch.float32
            if head_dim not in (1, 7, 64, 129):
                continue
            out_ref, lse_ref, grads, low = merge_attention_expected(out_a, lse_a, out_b, lse_b,
                                                                    dout, dlse)
            if special:
                assert (out_ref[2] == 0).all() and lse_ref[2] == NEG_INF
                assert out_ref[4:6].isnan().all() and lse_ref[4:6].isnan().all()
            assert [g.shape for g in grads] == [g.shape for g in low] == [
                (rows, head_dim), (rows,), (rows, head_dim), (rows,)]
            local, memory, gate, gdout = gated_merge_inputs(rows, head_dim, dtype, special, "cpu")
            out_ref, grads, low = gated_merge_expected(local, memory, gate, gdout)
            assert out_ref.shape == (rows, head_dim) and len(grads) == len(low) == 3
            if special:
                assert out_ref[3].isnan().all() and torch.isfinite(out_ref[:3]).all()
    # Misaligned copies and NaN-filled outputs keep the values and the requested offsets.
    x = torch.randn(6, 7)
    assert torch.equal(placed(x, 3), x) and placed(x, 3).storage_offset() == 3
    assert nan_filled((6, 7), torch.float32, misalign=1).isnan().all()
    for name, call in _bad_calls(torch.randn(4, 8), torch.randn(4)).items():
        assert callable(call), name


# A few cases whose bodies also run on CPU tensors with the CPU kernels in the CUDA kernels' place.
CPU_CASES = [(6, 7, (0, 0, 0), True), (37, 64, (0, 1, 3), False), (6, 129, (1, 1, 1), False),
             (0, 5, (0, 0, 0), False), (1, 1, (0, 0, 0), False)]


def check_merges(ext, device, case, dtype):
    check_merge_attention(ext, device, case, dtype)
    check_gated_merge(ext, device, case, dtype)


test_merge_bodies_run_on_cpu_kernels = cpu_kernels_test(check_merges, CPU_CASES, _case_id)
