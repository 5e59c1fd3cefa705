"""The CUDA gated dense update kernels of ``l2m_kernels._C_cuda`` (gated_dense_update_fwd / _bwd),
called directly on 4-D broadcast views as function.py's launcher passes them, against the float64
reference (``gated_dense_update_ref`` in ``l2m_kernels/ops/memory_write/reference.py``).

float32, float16 and bfloat16 on 4-D broadcast views (stride 0; contiguous and strided index paths;
1-D, 3-D and 5-D shapes as the launcher reshapes them; > 2**24 elements through the grid-stride
loop), gradients reduced to each input's shape like function.py, with huge and infinite logits /
updates, NaN inputs, empty shapes, outputs pre-filled with NaN, and bad calls.

Shared set-up, and the CPU kernels standing in without a CUDA device: ``tests/ops/_cuda.py``.
"""
from __future__ import annotations

import torch

from l2m_kernels.ops.memory_write.reference import gated_dense_update_ref
from l2m_kernels.testing import assert_close, nan_filled
from .._cuda import (NAN, assert_bad_calls_listed, bad_call_test, cpu_kernels_test,
                     cuda_kernel_test)

# (memory, update, input_gate, forget_gate shapes, special)
CASES = [
    ((2, 3, 7, 5), (2, 3, 7, 5), (2, 3, 7, 5), (2, 3, 7, 5), None),      # contiguous path
    ((2, 3, 7, 129), (2, 3, 7, 129), (2, 3, 7, 1), (3, 1, 1), None),      # broadcast gates
    ((3, 63, 7), (63, 7), (3, 63, 1), (1,), None),                        # 3-D, broadcast update
    ((7,), (7,), (1,), (7,), None),                                       # 1-D
    ((2, 2, 9, 33), (2, 2, 9, 33), (2, 2, 9, 1), (2, 2, 9, 1), "big"),    # huge |x|, +-inf
    ((2, 2, 9, 33), (2, 2, 9, 33), (2, 2, 9, 33), (1, 2, 1, 33), "nan"),
    ((2, 3, 4, 5, 6), (2, 3, 4, 5, 6), (2, 3, 4, 5, 1), (6,), None),      # 5-D: flattened
    ((4, 8, 16), (4, 8, 16), (4, 8, 16), (4, 8, 16), "transposed"),       # strided same-shape
    ((0, 3, 5), (0, 3, 5), (0, 3, 5), (1,), None),                        # empty
    ((65, 16, 128, 128), (65, 16, 128, 128), (65, 16, 128, 1), (16, 1, 1), None),  # > 2**24:
]                                                                         # grid-stride loop


def _case_id(case):
    *shapes, special = case
    return "-".join("x".join(map(str, s)) for s in shapes) + (f"-{special}" if special else "")


def broadcast_views4(*tensors):
    """As _broadcast_views4 in function.py: 4-D views of the broadcast shape (stride 0 where
    broadcast); shapes of more than 4 dimensions materialised and flattened to (1, 1, 1, numel).
    Returns the views and the broadcast shape."""
    shape = torch.broadcast_shapes(*(t.shape for t in tensors))
    if len(shape) > 4:
        return tuple(t.expand(shape).contiguous().view(1, 1, 1, -1) for t in tensors), shape
    shape4 = (1,) * (4 - len(shape)) + tuple(shape)
    return tuple(t.expand(shape4) for t in tensors), shape


def dense_inputs(case, dtype, device):
    """memory, update, input_gate, forget_gate in dtype, with the case's special values."""
    *shapes, special = case
    inputs = [torch.randn(s, device=device).to(dtype) for s in shapes]
    memory, update, input_gate, forget_gate = inputs
    if special == "big":
        input_gate[..., 0, 0] = 1e4
        input_gate[..., 1, 0] = -1e4
        input_gate[..., 2, 0] = float("inf")
        forget_gate[..., 3, 0] = float("-inf")
        forget_gate[..., 4, 0] = 1e4
        forget_gate[..., 5, 0] = -1e4
        update[..., 0, :3] = 1e4
        update[..., 1, :3] = float("-inf")
    if special == "nan":
        memory[0, 0, 0, 0] = NAN
        input_gate[0, 0, 1, 1] = NAN
        update[1, 1, 2, 2] = NAN
    if special == "transposed":
        inputs = [t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in inputs]
    return inputs


def dense_expected(inputs, dout):
    """The float64 reference (out, gradients of the four inputs) and the same at the input dtype
    (the baselines)."""
    results = []
    for cast in (torch.Tensor.double, torch.Tensor.clone):
        leaves = [cast(t).requires_grad_() for t in inputs]
        out = gated_dense_update_ref(*leaves)
        if out.numel():
            grads = torch.autograd.grad(out, leaves, cast(dout))
        else:
            grads = [torch.zeros_like(t) for t in leaves]
        results.append((out.detach(), grads))
    return results


def check_dense_update(ext, device, case, dtype):
    special = case[-1]
    inputs = dense_inputs(case, dtype, device)
    views, shape = broadcast_views4(*inputs)
    out = nan_filled(tuple(views[0].shape), dtype, device)
    ext.gated_dense_update_fwd(*views, out)
    dout = torch.randn(shape, device=device).to(dtype)
    (out64, expected), (low_out, baseline) = dense_expected(inputs, dout)
    assert_close("out", out.view(shape), out64, dtype, baseline=low_out)
    if special == "big":
        assert torch.isfinite(out).all(), "non-finite output for finite memory"

    grads = [nan_filled(tuple(views[0].shape), torch.float32, device) for _ in range(4)]
    ext.gated_dense_update_bwd(dout.contiguous().view(views[0].shape), *views, *grads)
    reduced = [g.view(shape).sum_to_size(t.shape).to(t.dtype) for g, t in zip(grads, inputs)]
    for name, actual, exp, base in zip(("dmemory", "dupdate", "dinput_gate", "dforget_gate"),
                                       reduced, expected, baseline):
        assert_close(name, actual, exp, dtype, baseline=base)
        if special == "big":
            assert torch.isfinite(actual).all(), f"non-finite {name}"


def _bad_calls(device):
    """Bad gated_dense_update calls and the exception type each raises; they never launch."""
    x = torch.randn(2, 3, 4, 5, device=device)
    gate = torch.randn(2, 3, 4, 1, device=device).expand(2, 3, 4, 5)
    grads = [torch.empty_like(x) for _ in range(4)]
    return {
        "3-D": (ValueError, lambda ext: ext.gated_dense_update_fwd(x[0], x[0], x[0], x[0],
                                                                   torch.empty_like(x[0]))),
        "shape": (ValueError, lambda ext: ext.gated_dense_update_fwd(x, x[..., :4], x, x,
                                                                     torch.empty_like(x))),
        "dtype": (TypeError, lambda ext: ext.gated_dense_update_fwd(x, x.half(), gate, gate,
                                                                    torch.empty_like(x))),
        "float64": (TypeError, lambda ext: ext.gated_dense_update_fwd(
            *(t.double() for t in (x, x, gate, gate)), torch.empty_like(x.double()))),
        "out non-contiguous": (ValueError, lambda ext: ext.gated_dense_update_fwd(
            x, x, gate, gate, torch.empty_like(x).transpose(2, 3).contiguous().transpose(2, 3))),
        "out is memory": (RuntimeError, lambda ext: ext.gated_dense_update_fwd(x, x.clone(), gate,
                                                                               gate, x)),
        "bwd half grads": (TypeError, lambda ext: ext.gated_dense_update_bwd(
            x, x, x, gate, gate, grads[0].half(), *grads[1:])),
        "bwd cpu": (ValueError, lambda ext: ext.gated_dense_update_bwd(
            x, x, x, gate, gate, grads[0].cpu(), *grads[1:])),
    }


test_dense_update_cuda = cuda_kernel_test(check_dense_update, CASES, _case_id)
test_dense_update_bad_call_raises = bad_call_test(_bad_calls)


def test_dense_update_cases_and_reference_side_on_cpu():
    """What the gpu tests run before the kernel, here on CPU tensors (float32): every case's
    inputs and 4-D views as the kernel gets them, and the reference side (small cases)."""
    assert len({_case_id(case) for case in CASES}) == len(CASES)
    for case in CASES:
        *shapes, special = case
        numel = torch.Size(torch.broadcast_shapes(*shapes)).numel()
        if numel > 100_000:  # the grid-stride case: its views only (seconds on a CPU otherwise)
            views, shape = broadcast_views4(*(torch.empty(()).expand(s) for s in shapes))
            assert numel > 2 ** 24 and views[0].shape == shape and len(shape) == 4
            continue
        inputs = dense_inputs(case, torch.float32, "cpu")
        views, shape = broadcast_views4(*inputs)
        assert all(v.dim() == 4 and v.shape == views[0].shape for v in views)
        assert views[0].numel() == numel
        if special == "transposed":
            assert not inputs[0].is_contiguous()
        (out, grads), (low_out, low_grads) = dense_expected(inputs, torch.randn(shape))
        assert out.shape == shape and [g.shape for g in grads] == [t.shape for t in inputs]
        if special == "big":
            assert torch.isfinite(out).all() and torch.isfinite(low_out).all()
        if special == "nan":
            assert out.isnan().any() and not out.isnan().all()
    assert_bad_calls_listed(_bad_calls)


# All cases but the > 2**24 elements one.
test_dense_update_body_runs_on_cpu_kernels = cpu_kernels_test(check_dense_update, CASES[:-1],
                                                              _case_id)
