"""Launchers, custom ops and autograd for ``product_key_read``.

The backward op returns ``(dq, dsubkeys, dvalues, value_slots)``: the values gradient either dense
``(n_sub**2, Dv)`` (``value_slots`` empty) or, with ``sparse_grad=True``, coalesced: one row per
distinct slot read, ``(U, Dv)``, for the sorted slots ``value_slots (U,)``. The autograd function
wraps those in a coalesced ``torch.sparse_coo`` tensor; the dense gradient is never formed. The cpu
kernel sums straight into the U rows (memory grows with the rows touched); the GPU backends write
one row per entry and coalesce them (a sort, deterministic).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ... import _ext
from ..._alloc import empty
from .._common import (acc_dtype, contiguous_like, declared_op, f32_accumulator, reference_vjp, rows_for,
                       store_accumulated)
from .plan import half_scratch, subkey_segments, value_segments
from .reference import product_key_gather, product_key_select
from .validate import check_args

cpu_rows = rows_for("cpu")


def _reference_fwd(q, subkeys, values, k, k_sub, scale, sum_heads, deterministic):
    indices = product_key_select(q, subkeys, k, k_sub, scale)
    out, weights, lse = product_key_gather(q, subkeys, values, indices, scale, sum_heads=sum_heads)
    return out.contiguous(), indices.contiguous(), weights.contiguous(), lse.contiguous()


def value_grad_rows(dout: Tensor, weights: Tensor, sum_heads: bool) -> Tensor:
    """d values[indices[b, h, t, j]] += weights[b, h, t, j] * dout[b, (h,) t]: one row per entry."""
    if sum_heads:
        dout = dout.unsqueeze(1)  # (B, 1, T, Dv): every head read into the same output
    rows = weights.unsqueeze(-1) * dout.unsqueeze(-2).to(weights.dtype)  # (B, H, T, k, Dv)
    return rows.reshape(-1, rows.shape[-1])


def coalesce_rows(indices: Tensor, rows: Tensor, num_slots: int) -> Tuple[Tensor, Tensor]:
    """One row per entry ``rows (E, Dv)`` at slots ``indices`` (E entries) -> the sorted distinct
    slots ``(U,)`` and their summed rows ``(U, Dv)`` (``torch.sparse_coo_tensor(...).coalesce()``)."""
    coalesced = torch.sparse_coo_tensor(indices.reshape(1, -1), rows, (num_slots, rows.shape[-1]),
                                        check_invariants=False).coalesce()
    # coalesce() of at most one entry returns its input's storage: clone the slots, which would
    # otherwise alias the custom op's ``indices`` input (custom ops may not return aliases).
    return coalesced.values(), coalesced.indices()[0].clone()


def _no_slots(values):
    return values.new_empty((0,), dtype=torch.int64)


def _gpu_value_grad(indices, dvalues, values, sparse_grad):
    """(dvalues, value_slots) of the GPU backwards: dense as written, or their per-entry rows
    coalesced (summed in float32, rounded once)."""
    if not sparse_grad:
        return dvalues, _no_slots(values)
    summed, slots = coalesce_rows(indices, dvalues.to(acc_dtype(values.dtype)), values.shape[0])
    return summed.to(values.dtype), slots


def _reference_bwd(dout, dweights, dlse, q, subkeys, values, indices, weights, scale, sum_heads,
                   sparse_grad, deterministic):
    # Values enter linearly: their gradient is the weighted scatter of dout; q and subkeys by vjp.
    dq, dsubkeys, _ = reference_vjp(
        lambda q_, s_, v_: product_key_gather(q_, s_, v_, indices, scale, sum_heads=sum_heads),
        (q, subkeys, values), (dout, dweights, dlse), (True, True, False))
    rows = value_grad_rows(dout, weights, sum_heads)
    if sparse_grad:
        summed, slots = coalesce_rows(indices, rows, values.shape[0])
        return dq, dsubkeys, summed.to(values.dtype), slots
    dense = torch.zeros(values.shape, dtype=rows.dtype, device=values.device)
    dense.index_add_(0, indices.reshape(-1), rows)
    return dq, dsubkeys, dense.to(values.dtype), _no_slots(values)


def _fwd_outputs(q, values, k, sum_heads):
    """The forward's output buffers: out (B, T, Dv) with ``sum_heads``, else (B, H, T, Dv), in q's
    dtype; indices (B, H, T, k) int64; weights (B, H, T, k) and lse (B, H, T) in the accumulation
    dtype."""
    B, H, T, _ = q.shape
    acc = acc_dtype(q.dtype)
    Dv = values.shape[-1]
    out = empty((B, T, Dv) if sum_heads else (B, H, T, Dv), dtype=q.dtype, device=q.device)
    indices = empty((B, H, T, k), dtype=torch.int64, device=q.device)
    weights = empty((B, H, T, k), dtype=acc, device=q.device)
    lse = empty((B, H, T), dtype=acc, device=q.device)
    return out, indices, weights, lse


def _gpu_bwd_outputs(q, subkeys, values, indices, sparse_grad):
    """The GPU backward's gradient buffers: dq and dsubkeys of their inputs' shapes, dvalues of
    values' shape, or (B * H * T * k, Dv) per-entry rows with ``sparse_grad``."""
    dq = empty(q.shape, dtype=q.dtype, device=q.device)
    dsubkeys = empty(subkeys.shape, dtype=subkeys.dtype, device=q.device)
    dvalues_shape = (indices.numel(), values.shape[-1]) if sparse_grad else values.shape
    dvalues = empty(dvalues_shape, dtype=values.dtype, device=q.device)
    return dq, dsubkeys, dvalues


def _cpu_fwd(q, subkeys, values, k, k_sub, scale, sum_heads, deterministic):
    # The cpu kernels are deterministic by construction; `deterministic` needs no switch.
    out, indices, weights, lse = _fwd_outputs(q, values, k, sum_heads)
    if lse.numel():  # B * H * T
        _ext.cpu_extension().product_key_fwd(cpu_rows(q), subkeys.contiguous(), values.contiguous(),
                                             k, k_sub, scale, sum_heads, out, indices, weights, lse)
    elif out.numel():
        out.zero_()  # sum_heads with H == 0: a sum over no heads
    return out, indices, weights, lse


def _cpu_bwd(dout, dweights, dlse, q, subkeys, values, indices, weights, scale, sum_heads,
             sparse_grad, deterministic):
    dq = empty(q.shape, dtype=q.dtype, device=q.device)
    dsubkeys = empty(subkeys.shape, dtype=subkeys.dtype, device=q.device)
    indices = indices.contiguous()
    # The entries by slot, each slot's in entry order: the order the kernel sums every dvalues row in
    # (int32 keys where the slots fit: half the radix sort's passes).
    keys = indices.reshape(-1)
    sorted_slots, entry_order = torch.sort(keys.int() if values.shape[0] < 2**31 else keys, stable=True)
    slots, value_rows = _no_slots(values), None
    if sparse_grad:  # one row per distinct slot: entry m adds to the row of its slot's rank
        slots, sorted_rows = torch.unique_consecutive(sorted_slots, return_inverse=True)
        slots = slots.long()
        value_rows = torch.empty_like(sorted_rows).scatter_(0, entry_order, sorted_rows).view(indices.shape)
    dvalues_shape = (slots.numel(), values.shape[-1]) if sparse_grad else values.shape
    dvalues = empty(dvalues_shape, dtype=values.dtype, device=q.device)
    _ext.cpu_extension().product_key_bwd(
        cpu_rows(dout), dweights.contiguous(), dlse.contiguous(), cpu_rows(q), subkeys.contiguous(),
        values.contiguous(), indices, weights.contiguous(), scale, sum_heads, sparse_grad, entry_order,
        dq, dsubkeys, dvalues, value_rows)
    return dq, dsubkeys, dvalues, slots


def _triton_fwd(q, subkeys, values, k, k_sub, scale, sum_heads, deterministic):
    # The forward has no float atomics (heads summed in a fixed order): always deterministic.
    from . import triton as triton_kernels
    out, indices, weights, lse = _fwd_outputs(q, values, k, sum_heads)
    triton_kernels.product_key_fwd(q.contiguous(), subkeys.contiguous(), values.contiguous(), k, k_sub, scale,
                                   sum_heads, out, indices, weights, lse)
    return out, indices, weights, lse


def _triton_bwd(dout, dweights, dlse, q, subkeys, values, indices, weights, scale, sum_heads,
                sparse_grad, deterministic):
    from . import triton as triton_kernels
    dq, dsubkeys, dvalues = _gpu_bwd_outputs(q, subkeys, values, indices, sparse_grad)
    triton_kernels.product_key_bwd(
        dout.contiguous(), dweights.contiguous(), dlse.contiguous(), q.contiguous(), subkeys.contiguous(),
        values.contiguous(), indices.contiguous(), weights.contiguous(), scale, sum_heads, sparse_grad,
        deterministic, dq, dsubkeys, dvalues)
    return (dq, dsubkeys) + _gpu_value_grad(indices, dvalues, values, sparse_grad)


def cuda_product_key_fwd(ext, q, subkeys, values, k, k_sub, scale, sum_heads, out, indices, weights, lse):
    """The cuda forward into preallocated outputs, through ``ext`` (``l2m_kernels._C_cuda``; the
    arguments of the triton launcher ``product_key_fwd``), with the scratch between its kernels
    (:func:`.plan.half_scratch`). B * H * T == 0: nothing is written but a sum_heads ``out`` over no
    heads, zeroed."""
    # A k_sub out of range is refused by product_key_fwd, with the scratch of none.
    half_scores, half_ids = half_scratch(q, max(k_sub, 0))
    ext.product_key_fwd(q, subkeys, values, k, k_sub, scale, sum_heads, half_scores, half_ids, out, indices,
                        weights, lse)


def cuda_product_key_bwd(ext, dout, dweights, dlse, q, subkeys, values, indices, weights, scale, sum_heads,
                         sparse_grad, deterministic, dq, dsubkeys, dvalues):
    """The cuda backward into preallocated gradients, through ``ext`` (``l2m_kernels._C_cuda``; the
    arguments of the triton launcher ``product_key_bwd``).

    ``deterministic``: ``product_key_bwd`` writes dq, the sparse rows and each entry's ds (float32
    scratch), then ``product_key_segment_sum`` sums dsubkeys and a dense dvalues over the entries
    grouped by row (:func:`.plan.subkey_segments`, :func:`.plan.value_segments`) in a fixed order.
    Else float32 atomics into zeroed accumulators, copied into dsubkeys / dvalues afterwards.
    """
    if not deterministic:
        dsubkeys_acc = f32_accumulator(dsubkeys)
        dvalues_acc = None if sparse_grad else f32_accumulator(dvalues)
        ext.product_key_bwd(dout, dweights, dlse, q, subkeys, values, indices, weights, scale, sum_heads,
                            sparse_grad, False, None, dsubkeys_acc, dvalues_acc, dq, dsubkeys, dvalues)
        store_accumulated(dsubkeys, dsubkeys_acc)
        if not sparse_grad:
            store_accumulated(dvalues, dvalues_acc)
        return
    ds = torch.empty((indices.numel(),), dtype=torch.float32, device=q.device)
    ext.product_key_bwd(dout, dweights, dlse, q, subkeys, values, indices, weights, scale, sum_heads,
                        sparse_grad, True, ds, None, None, dq, dsubkeys, dvalues)
    if indices.numel() == 0:  # no entry: product_key_bwd zeroed the gradients
        return
    # The call passed its checks: the shapes below are the kernels'. Explicit sizes: views of
    # tensors without elements (Dk or Dv = 0) have no -1 size.
    B, H, T, k = indices.shape
    n_sub, half = subkeys.shape[-2:]
    ext.product_key_segment_sum(q.view(B * H * T * 2, half), ds, *subkey_segments(indices, n_sub), scale,
                                dsubkeys.view(H * 2 * n_sub, half))
    if not sparse_grad:
        dout_rows = dout.view((B * T if sum_heads else B * H * T), dout.shape[-1])
        ext.product_key_segment_sum(dout_rows, weights.view(indices.numel()),
                                    *value_segments(indices, values.shape[0], sum_heads), 1.0, dvalues)


def _cuda_fwd(q, subkeys, values, k, k_sub, scale, sum_heads, deterministic):
    # The forward has no float atomics (heads summed in a fixed order): always deterministic.
    out, indices, weights, lse = _fwd_outputs(q, values, k, sum_heads)
    cuda_product_key_fwd(_ext.cuda_extension(), q.contiguous(), subkeys.contiguous(), values.contiguous(), k,
                         k_sub, scale, sum_heads, out, indices, weights, lse)
    return out, indices, weights, lse


def _cuda_bwd(dout, dweights, dlse, q, subkeys, values, indices, weights, scale, sum_heads,
              sparse_grad, deterministic):
    dq, dsubkeys, dvalues = _gpu_bwd_outputs(q, subkeys, values, indices, sparse_grad)
    cuda_product_key_bwd(
        _ext.cuda_extension(), dout.contiguous(), dweights.contiguous(), dlse.contiguous(), q.contiguous(),
        subkeys.contiguous(), values.contiguous(), indices.contiguous(), weights.contiguous(), scale, sum_heads,
        sparse_grad, deterministic, dq, dsubkeys, dvalues)
    return (dq, dsubkeys) + _gpu_value_grad(indices, dvalues, values, sparse_grad)


FWD = {"reference": _reference_fwd, "cpu": _cpu_fwd, "triton": _triton_fwd, "cuda": _cuda_fwd}
BWD = {"reference": _reference_bwd, "cpu": _cpu_bwd, "triton": _triton_bwd, "cuda": _cuda_bwd}


@declared_op("product_key_read")
def product_key_read_op(q: Tensor, subkeys: Tensor, values: Tensor, k: int, k_sub: Optional[int] = None,
                        scale: Optional[float] = None, sum_heads: bool = False, sparse_grad: bool = False,
                        deterministic: bool = False, backend: str = "auto"
                        ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    k, k_sub, scale, sum_heads, sparse_grad, deterministic, backend = check_args(
        q, subkeys, values, k, k_sub, scale, sum_heads, sparse_grad, deterministic, backend)
    return FWD[backend](q, subkeys, values, k, k_sub, scale, sum_heads, deterministic)


@product_key_read_op.register_fake
def _(q, subkeys, values, k, k_sub, scale, sum_heads, sparse_grad, deterministic, backend):
    B, H, T, _ = q.shape
    acc = acc_dtype(q.dtype)
    out_shape = (B, T, values.shape[-1]) if sum_heads else (B, H, T, values.shape[-1])
    return (q.new_empty(out_shape), q.new_empty((B, H, T, k), dtype=torch.int64),
            q.new_empty((B, H, T, k), dtype=acc), q.new_empty((B, H, T), dtype=acc))


@torch.library.custom_op("l2m::product_key_read_backward", mutates_args=())
def product_key_read_backward_op(dout: Tensor, dweights: Tensor, dlse: Tensor, q: Tensor, subkeys: Tensor,
                                 values: Tensor, indices: Tensor, weights: Tensor, scale: float,
                                 sum_heads: bool, sparse_grad: bool, deterministic: bool, backend: str
                                 ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return BWD[backend](dout, dweights, dlse, q, subkeys, values, indices, weights, scale, sum_heads,
                        sparse_grad, deterministic)


@product_key_read_backward_op.register_fake
def _(dout, dweights, dlse, q, subkeys, values, indices, weights, scale, sum_heads, sparse_grad,
      deterministic, backend):
    if sparse_grad:  # one row per distinct slot read: a data-dependent count
        rows = torch.library.get_ctx().new_dynamic_size()
        dvalues = values.new_empty((rows, values.shape[-1]))
        slots = values.new_empty((rows,), dtype=torch.int64)
    else:
        dvalues, slots = contiguous_like(values), values.new_empty((0,), dtype=torch.int64)
    return contiguous_like(q), contiguous_like(subkeys), dvalues, slots


def _setup(ctx, inputs, output):
    q, subkeys, values = inputs[:3]
    # defaults and "auto", resolved as the forward did
    k, k_sub, scale, sum_heads, sparse_grad, deterministic, backend = check_args(*inputs)
    ctx.save_for_backward(q, subkeys, values, output[1], output[2])
    ctx.options = (scale, sum_heads, sparse_grad, deterministic, backend)


def _backward(ctx, dout, dindices, dweights, dlse):
    q, subkeys, values, indices, weights = ctx.saved_tensors
    scale, sum_heads, sparse_grad, deterministic, backend = ctx.options
    B, H, T, k = indices.shape
    acc = acc_dtype(q.dtype)
    if dout is None:
        dout = q.new_zeros((B, T, values.shape[-1]) if sum_heads else (B, H, T, values.shape[-1]))
    dweights = q.new_zeros((B, H, T, k), dtype=acc) if dweights is None else dweights
    dlse = q.new_zeros((B, H, T), dtype=acc) if dlse is None else dlse
    dq, dsubkeys, dvalues, value_slots = torch.ops.l2m.product_key_read_backward(
        dout, dweights, dlse, q, subkeys, values, indices, weights, scale, sum_heads, sparse_grad,
        deterministic, backend)
    if sparse_grad:  # rows already summed per distinct slot, slots sorted: coalesced as built
        dvalues = torch.sparse_coo_tensor(value_slots.unsqueeze(0), dvalues, values.shape,
                                          check_invariants=False, is_coalesced=True)
    needs = ctx.needs_input_grad
    return (dq if needs[0] else None, dsubkeys if needs[1] else None, dvalues if needs[2] else None,
            None, None, None, None, None, None, None)


torch.library.register_autograd("l2m::product_key_read", _backward, setup_context=_setup)
