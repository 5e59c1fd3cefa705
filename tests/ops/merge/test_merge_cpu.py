"""Smoke test of the CPU extension ``l2m_kernels._C`` called directly (no Python dispatch layer).

The four merge functions of the low-level interface are compared with the reference ops, computed
in float64 on the same (already rounded) inputs, at odd sizes, R = 0, every dtype, with rows whose
lse is -inf on one side or both, and NaN rows that must not leak into other rows. Outputs are
pre-filled with NaN so that an element the kernel forgets to write fails the comparison.
Gradients are checked against ``torch.autograd.grad`` of the float64 reference.
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

from l2m_kernels.ops.merge.reference import gated_merge_ref, merge_attention_ref  # noqa: E402
from l2m_kernels.testing import assert_close  # noqa: E402

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
ROWS = [0, 1, 7, 129]
DIMS = [1, 7, 64, 129]

# Special rows, present when R >= 7 (row 0 stays ordinary).
ROW_A_EMPTY, ROW_B_EMPTY, ROW_BOTH_EMPTY = 1, 2, 3
ROW_NAN_LSE, ROW_NAN_VALUE, ROW_NAN_AND_EMPTY = 4, 5, 6
NAN_ROWS = (ROW_NAN_LSE, ROW_NAN_VALUE, ROW_NAN_AND_EMPTY)


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def nan_filled(*shape, dtype):
    return torch.full(shape, math.nan, dtype=dtype)


def randn(*shape, dtype, generator, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float64, generator=generator) * scale).to(dtype)


def merge_inputs(rows, dim, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    acc = acc_dtype(dtype)
    out_a = randn(rows, dim, dtype=dtype, generator=gen)
    out_b = randn(rows, dim, dtype=dtype, generator=gen)
    lse_a = randn(rows, dtype=acc, generator=gen, scale=3.0)
    lse_b = randn(rows, dtype=acc, generator=gen, scale=3.0)
    if rows >= 7:
        lse_a[ROW_A_EMPTY] = -math.inf
        lse_b[ROW_B_EMPTY] = -math.inf
        lse_a[ROW_BOTH_EMPTY] = lse_b[ROW_BOTH_EMPTY] = -math.inf
        lse_a[ROW_NAN_LSE] = math.nan
        out_b[ROW_NAN_VALUE, dim // 2] = math.nan
        lse_a[ROW_NAN_AND_EMPTY], lse_b[ROW_NAN_AND_EMPTY] = math.nan, -math.inf
    return out_a, lse_a, out_b, lse_b


def gated_inputs(rows, dim, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out_local = randn(rows, dim, dtype=dtype, generator=gen)
    out_mem = randn(rows, dim, dtype=dtype, generator=gen)
    gate = randn(rows, dtype=dtype, generator=gen, scale=2.0)
    if rows >= 7:
        gate[1], gate[2] = -math.inf, math.inf  # g = 0 and g = 1 exactly
        gate[ROW_NAN_LSE] = math.nan
        out_mem[ROW_NAN_VALUE, dim // 2] = math.nan
    return out_local, out_mem, gate


def over_rows_dims_dtypes(test):
    """Parametrize ``test(rows, dim, dtype)`` over ROWS x DIMS x DTYPES."""
    for mark in (pytest.mark.parametrize("rows", ROWS), pytest.mark.parametrize("dim", DIMS),
                 pytest.mark.parametrize("dtype", DTYPES, ids=str)):
        test = mark(test)
    return test


def finite_rows(rows):
    """Rows with no NaN input: their gradients must match the reference exactly as usual."""
    keep = torch.ones(rows, dtype=torch.bool)
    if rows >= 7:
        keep[list(NAN_ROWS)] = False
    return keep


def assert_nan_rows_isolated(name, tensor, rows):
    """Every row without NaN input is NaN-free (the NaN rows and the NaN prefill did not leak)."""
    keep = finite_rows(rows)
    assert not torch.isnan(tensor[keep]).any(), f"{name}: NaN outside the NaN rows"


@over_rows_dims_dtypes
def test_merge_attention_fwd(rows, dim, dtype):
    out_a, lse_a, out_b, lse_b = merge_inputs(rows, dim, dtype)
    out = nan_filled(rows, dim, dtype=dtype)
    lse = nan_filled(rows, dtype=acc_dtype(dtype))
    cpu_ext.merge_attention_fwd(out_a, lse_a, out_b, lse_b, out, lse)

    ref_out, ref_lse = merge_attention_ref(out_a.double(), lse_a.double(), out_b.double(),
                                           lse_b.double())
    assert_close("out", out, ref_out, dtype=dtype)
    assert_close("lse", lse, ref_lse, dtype=dtype)
    if rows >= 7:
        assert torch.equal(out[ROW_BOTH_EMPTY], torch.zeros(dim, dtype=dtype))
        assert lse[ROW_BOTH_EMPTY] == -math.inf
        assert torch.isnan(lse[ROW_NAN_LSE]) and torch.isnan(out[ROW_NAN_LSE]).all()
        assert torch.isnan(lse[ROW_NAN_AND_EMPTY]) and torch.isnan(out[ROW_NAN_AND_EMPTY]).all()
        assert torch.isfinite(lse[ROW_NAN_VALUE])  # a NaN value spoils its element, not the lse
        assert torch.isnan(out[ROW_NAN_VALUE]).sum() == 1
    assert_nan_rows_isolated("out", out, rows)


@over_rows_dims_dtypes
def test_merge_attention_bwd(rows, dim, dtype):
    acc = acc_dtype(dtype)
    out_a, lse_a, out_b, lse_b = merge_inputs(rows, dim, dtype)
    gen = torch.Generator().manual_seed(1)
    dout = randn(rows, dim, dtype=dtype, generator=gen)
    dlse = randn(rows, dtype=acc, generator=gen)
    lse = nan_filled(rows, dtype=acc)
    cpu_ext.merge_attention_fwd(out_a, lse_a, out_b, lse_b, nan_filled(rows, dim, dtype=dtype), lse)

    d_out_a, d_out_b = nan_filled(rows, dim, dtype=dtype), nan_filled(rows, dim, dtype=dtype)
    d_lse_a, d_lse_b = nan_filled(rows, dtype=acc), nan_filled(rows, dtype=acc)
    cpu_ext.merge_attention_bwd(dout, dlse, out_a, lse_a, out_b, lse_b, lse,
                                d_out_a, d_lse_a, d_out_b, d_lse_b)

    leaves = [t.double().requires_grad_() for t in (out_a, lse_a, out_b, lse_b)]
    ref_out, ref_lse = merge_attention_ref(*leaves)
    if rows == 0:
        ref_grads = [torch.zeros_like(t) for t in leaves]
    else:
        ref_grads = torch.autograd.grad((ref_out, ref_lse), leaves, (dout.double(), dlse.double()))
    keep = finite_rows(rows)
    for name, actual, expected in zip(("d_out_a", "d_lse_a", "d_out_b", "d_lse_b"),
                                      (d_out_a, d_lse_a, d_out_b, d_lse_b), ref_grads):
        assert_close(name, actual[keep], expected[keep], dtype=dtype)
        assert_nan_rows_isolated(name, actual, rows)
    if rows >= 7:
        # An empty side gets exactly zero gradient, also when both sides are empty.
        assert (d_out_a[ROW_A_EMPTY] == 0).all() and d_lse_a[ROW_A_EMPTY] == 0
        assert (d_out_b[ROW_B_EMPTY] == 0).all() and d_lse_b[ROW_B_EMPTY] == 0
        assert d_lse_a[ROW_BOTH_EMPTY] == 0 and d_lse_b[ROW_BOTH_EMPTY] == 0
        assert torch.isnan(d_lse_a[ROW_NAN_LSE]) and torch.isnan(d_lse_b[ROW_NAN_LSE])


@over_rows_dims_dtypes
def test_gated_merge_fwd(rows, dim, dtype):
    out_local, out_mem, gate = gated_inputs(rows, dim, dtype)
    out = nan_filled(rows, dim, dtype=dtype)
    cpu_ext.gated_merge_fwd(out_local, out_mem, gate, out)

    ref = gated_merge_ref(out_local.double(), out_mem.double(), gate.double().unsqueeze(-1))
    assert_close("out", out, ref, dtype=dtype)
    if rows >= 7:
        assert torch.equal(out[1], out_local[1]) and torch.equal(out[2], out_mem[2])
        assert torch.isnan(out[ROW_NAN_LSE]).all()
        assert torch.isnan(out[ROW_NAN_VALUE]).sum() == 1
    assert_nan_rows_isolated("out", out, rows)


@over_rows_dims_dtypes
def test_gated_merge_bwd(rows, dim, dtype):
    out_local, out_mem, gate = gated_inputs(rows, dim, dtype)
    gen = torch.Generator().manual_seed(1)
    dout = randn(rows, dim, dtype=dtype, generator=gen)
    d_local, d_mem = nan_filled(rows, dim, dtype=dtype), nan_filled(rows, dim, dtype=dtype)
    d_gate = nan_filled(rows, dtype=acc_dtype(dtype))
    cpu_ext.gated_merge_bwd(dout, out_local, out_mem, gate, d_local, d_mem, d_gate)

    leaves = [t.double().requires_grad_() for t in (out_local, out_mem, gate)]
    ref_out = gated_merge_ref(leaves[0], leaves[1], leaves[2].unsqueeze(-1))
    if rows == 0:
        ref_grads = [torch.zeros_like(t) for t in leaves]
    else:
        ref_grads = torch.autograd.grad(ref_out, leaves, dout.double())
    keep = finite_rows(rows)
    for name, actual, expected in zip(("d_local", "d_mem", "d_gate"), (d_local, d_mem, d_gate),
                                      ref_grads):
        assert_close(name, actual[keep], expected[keep], dtype=dtype)
        assert_nan_rows_isolated(name, actual, rows)
    if rows >= 7:
        assert d_gate[1] == 0 and d_gate[2] == 0  # saturated gates pass no gradient
        assert torch.isnan(d_gate[ROW_NAN_LSE]) and torch.isnan(d_gate[ROW_NAN_VALUE])


def test_large_rows_use_threads_and_match():
    # Enough work for at::parallel_for to split rows across threads; float32 vs float64 reference.
    rows, dim = 4099, 96
    out_a, lse_a, out_b, lse_b = merge_inputs(rows, dim, torch.float32, seed=3)
    out, lse = nan_filled(rows, dim, dtype=torch.float32), nan_filled(rows, dtype=torch.float32)
    cpu_ext.merge_attention_fwd(out_a, lse_a, out_b, lse_b, out, lse)
    ref_out, ref_lse = merge_attention_ref(out_a.double(), lse_a.double(), out_b.double(),
                                           lse_b.double())
    assert_close("out", out, ref_out, tol=1e-6)
    assert_close("lse", lse, ref_lse, tol=1e-6)


def test_build_info():
    assert cpu_ext.TORCH_VERSION == torch.__version__
    info = cpu_ext.BUILD_INFO
    assert info["torch"] == torch.__version__ and info["cpu_ext"] is True
    assert set(info) >= {"torch", "cpu_ext", "cuda_ext", "cuda_archs", "cpu_arch", "openmp"}


def test_bad_arguments_raise_instead_of_reading_out_of_bounds():
    out_a, lse_a, out_b, lse_b = merge_inputs(5, 8, torch.float32)
    out, lse = torch.empty(5, 8), torch.empty(5)
    with pytest.raises(ValueError, match="out_b"):
        cpu_ext.merge_attention_fwd(out_a, lse_a, out_b[:4], lse_b, out, lse)
    with pytest.raises(ValueError, match="lse"):
        cpu_ext.merge_attention_fwd(out_a, lse_a, out_b, lse_b, out, torch.empty(4))
    with pytest.raises(TypeError, match="lse_a"):
        cpu_ext.merge_attention_fwd(out_a, lse_a.double(), out_b, lse_b, out, lse)
    with pytest.raises(TypeError, match="gate"):
        cpu_ext.gated_merge_fwd(out_a, out_b, torch.zeros(5, dtype=torch.float16), out)
    with pytest.raises(TypeError):
        cpu_ext.gated_merge_fwd(out_a.int(), out_b.int(), torch.zeros(5).int(), out.int())
    with pytest.raises(ValueError, match="contiguous"):
        cpu_ext.merge_attention_fwd(out_a, lse_a, torch.empty(8, 5).t(), lse_b, out, lse)
    with pytest.raises(ValueError, match="shape"):
        cpu_ext.gated_merge_bwd(out_a, out_a, out_b, lse_a, out, torch.empty(5, 9), lse)
    storage = torch.randn(6 * 8)
    with pytest.raises(RuntimeError):  # an output partially overlapping an input
        cpu_ext.gated_merge_fwd(storage[:40].view(5, 8), out_b, lse_a, storage[8:].view(5, 8))


def test_output_may_alias_an_input_exactly():
    out_local, out_mem, gate = gated_inputs(7, 33, torch.float32)
    expected = gated_merge_ref(out_local.double(), out_mem.double(), gate.double().unsqueeze(-1))
    cpu_ext.gated_merge_fwd(out_local, out_mem, gate, out_local)  # in place
    assert_close("out", out_local, expected)
