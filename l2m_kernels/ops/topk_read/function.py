"""Launchers, custom ops and autograd for ``topk_memory_read``.

``torch.ops.l2m.topk_memory_read`` returns ``(out, indices, weights, lse)``; its backward op
``torch.ops.l2m.topk_memory_read_backward`` takes the saved indices, so the backward is sparse (only
the k selected slots per query are touched). Backends other than the reference plug their
``_fwd``/``_bwd`` launchers into :data:`FWD` / :data:`BWD`.
"""
from __future__ import annotations

from functools import partial
from typing import Optional, Tuple

import torch
from torch import Tensor

from ... import _ext
from ..._alloc import empty
from .._common import (acc_dtype, contiguous_like, declared_op, f32_accumulator, read_outputs_like, reference_vjp,
                       rows_for, store_accumulated)
from .plan import slot_runs, threshold_tau
from .reference import topk_read_gather, topk_read_select
from .validate import check_args, check_values


def _reference_fwd(q, keys, values, k, scale, valid_len, deterministic):
    indices = topk_read_select(q, keys, k, scale, valid_len)
    out, weights, lse = topk_read_gather(q, keys, values, indices, scale)
    return out.contiguous(), indices.contiguous(), weights.contiguous(), lse.contiguous()


def _reference_bwd(dout, dweights, dlse, q, keys, values, indices, weights, scale, deterministic):
    # weights are recomputed by the gather; the argument keeps one signature for every backend.
    return tuple(reference_vjp(lambda q_, k_, v_: topk_read_gather(q_, k_, v_, indices, scale),
                               (q, keys, values), (dout, dweights, dlse), (True, True, True)))


def cuda_topk_read_fwd(ext, q, keys, values, valid_len, k, scale, out, indices, weights, lse,
                       use_threshold=True):
    """The cuda forward into preallocated outputs, through ``ext`` (``l2m_kernels._C_cuda``; the
    arguments of the triton launcher ``topk_read_fwd``).

    With ``use_threshold`` and at least k chunks of slots, a pre-pass (``topk_read_chunk_max``)
    writes each row's chunk maxima of the sort keys, whose k-th largest, tau
    (:func:`.plan.threshold_tau`), bounds the row's k-th best key from below: the selection then
    merges only candidates >= tau. Without it the selection kernel alone (the same result).
    """
    tau = None
    # A malformed q or keys: topk_read_fwd says what is wrong.
    if use_threshold and q.dim() == 4 and keys.dim() >= 2 and q.shape[:-1].numel():
        num_chunks = ext.topk_read_num_chunks(keys.shape[-2])
        if num_chunks >= k:
            chunk_max = torch.empty((*q.shape[:-1], num_chunks), dtype=torch.int64, device=q.device)
            ext.topk_read_chunk_max(q, keys, values, valid_len, k, scale, chunk_max)
            tau = threshold_tau(chunk_max, k)
    ext.topk_read_fwd(q, keys, values, valid_len, k, scale, tau, out, indices, weights, lse)


def cuda_topk_read_bwd(ext, dout, dweights, dlse, q, keys, values, indices, weights, scale, deterministic,
                       dq, dkeys, dvalues):
    """The cuda backward into preallocated gradients, through ``ext`` (``l2m_kernels._C_cuda``; the
    arguments of the triton launcher ``topk_read_bwd``).

    ``deterministic``: the slot gradients are summed per slot in a fixed order, over the entries
    grouped by :func:`.plan.slot_runs`, with a (B*H*T*k,) float32 scratch of each entry's ds. Else
    float32 atomics into zeroed accumulators, copied into dkeys / dvalues afterwards.
    """
    if deterministic:
        plan = (None,) * 3
        # Without entries no kernel runs; a malformed call is refused by topk_read_bwd.
        if (indices.dim() == 4 and indices.numel() and keys.dim() in (3, 4) and keys.shape[-3]
                and indices.shape[1] % keys.shape[-3] == 0):
            plan = slot_runs(indices, keys.shape[-3], keys.shape[-2], keys.dim() == 3)
        ds = torch.empty((indices.numel(),), dtype=torch.float32, device=q.device)
        ext.topk_read_bwd(dout, dweights, dlse, q, keys, values, indices, weights, scale, True, *plan, ds,
                          None, None, dq, dkeys, dvalues)
        return
    dkeys_acc, dvalues_acc = f32_accumulator(dkeys), f32_accumulator(dvalues)
    ext.topk_read_bwd(dout, dweights, dlse, q, keys, values, indices, weights, scale, False, None, None, None,
                      None, dkeys_acc, dvalues_acc, dq, dkeys, dvalues)
    store_accumulated(dkeys, dkeys_acc)
    store_accumulated(dvalues, dvalues_acc)


def _kernels(backend: str):
    """``backend``'s (topk_read_fwd, topk_read_bwd), with the triton launchers' arguments (the cpu
    backward takes no ``deterministic``)."""
    if backend == "cpu":
        ext = _ext.cpu_extension()
        return ext.topk_read_fwd, ext.topk_read_bwd
    if backend == "cuda":
        ext = _ext.cuda_extension()
        return partial(cuda_topk_read_fwd, ext), partial(cuda_topk_read_bwd, ext)
    from . import triton as triton_kernels
    return triton_kernels.topk_read_fwd, triton_kernels.topk_read_bwd


def _fused_fwd(backend):
    rows = rows_for(backend)

    def fwd(q, keys, values, k, scale, valid_len, deterministic):
        B, H, T, _ = q.shape
        acc = acc_dtype(q.dtype)
        out = empty((B, H, T, values.shape[-1]), dtype=q.dtype, device=q.device)
        indices = empty((B, H, T, k), dtype=torch.int64, device=q.device)
        weights = empty((B, H, T, k), dtype=acc, device=q.device)
        lse = empty((B, H, T), dtype=acc, device=q.device)
        if B * H * T:
            vl = None if valid_len is None else valid_len.to(torch.int64).contiguous()
            _kernels(backend)[0](rows(q), keys.contiguous(), values.contiguous(), vl, k, scale, out, indices,
                                 weights, lse)
        return out, indices, weights, lse
    return fwd


def _fused_bwd(backend):
    rows = rows_for(backend)

    def bwd(dout, dweights, dlse, q, keys, values, indices, weights, scale, deterministic):
        dq = empty(q.shape, dtype=q.dtype, device=q.device)
        dkeys = empty(keys.shape, dtype=keys.dtype, device=q.device)
        dvalues = empty(values.shape, dtype=values.dtype, device=q.device)
        args = (rows(dout), dweights.contiguous(), dlse.contiguous(), rows(q), keys.contiguous(),
                values.contiguous(), indices.contiguous(), weights.contiguous(), scale)
        if backend != "cpu":  # the cpu backward is always deterministic (per-slot reduction order)
            args = args + (deterministic,)
        _kernels(backend)[1](*args, dq, dkeys, dvalues)
        return dq, dkeys, dvalues
    return bwd


FWD = {"reference": _reference_fwd, **{name: _fused_fwd(name) for name in ("cpu", "triton", "cuda")}}
BWD = {"reference": _reference_bwd, **{name: _fused_bwd(name) for name in ("cpu", "triton", "cuda")}}


def topk_memory_read_fwd(q, keys, values, k, scale, valid_len, deterministic, backend):
    return FWD[backend](q, keys, values, k, scale, valid_len, deterministic)


def topk_memory_read_bwd(dout, dweights, dlse, q, keys, values, indices, weights, scale, deterministic, backend):
    return BWD[backend](dout, dweights, dlse, q, keys, values, indices, weights, scale, deterministic)


@declared_op("topk_memory_read")
def topk_memory_read_op(q: Tensor, keys: Tensor, values: Tensor, k: int, scale: Optional[float] = None,
                        valid_len: Optional[Tensor] = None, deterministic: bool = False, backend: str = "auto"
                        ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    args = (q, keys, values, k, scale, valid_len, deterministic, backend)
    k, scale, valid_len, deterministic, backend = check_args(*args)
    check_values(*args)
    return topk_memory_read_fwd(q, keys, values, k, scale, valid_len, deterministic, backend)


@topk_memory_read_op.register_fake
def _(q, keys, values, k, scale, valid_len, deterministic, backend):
    return read_outputs_like(q, values.shape[-1], k)


@torch.library.custom_op("l2m::topk_memory_read_backward", mutates_args=())
def topk_memory_read_backward_op(dout: Tensor, dweights: Tensor, dlse: Tensor, q: Tensor, keys: Tensor,
                                 values: Tensor, indices: Tensor, weights: Tensor, scale: float,
                                 deterministic: bool, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    return topk_memory_read_bwd(dout, dweights, dlse, q, keys, values, indices, weights, scale, deterministic,
                                backend)


@topk_memory_read_backward_op.register_fake
def _(dout, dweights, dlse, q, keys, values, indices, weights, scale, deterministic, backend):
    return contiguous_like(q), contiguous_like(keys), contiguous_like(values)


def _setup(ctx, inputs, output):
    q, keys, values = inputs[:3]
    _, scale, _, deterministic, backend = check_args(*inputs)  # defaults and "auto", as the forward did
    ctx.save_for_backward(q, keys, values, output[1], output[2])
    ctx.scale, ctx.deterministic, ctx.backend = scale, deterministic, backend


def _backward(ctx, dout, dindices, dweights, dlse):
    q, keys, values, indices, weights = ctx.saved_tensors
    B, H, T, k = indices.shape
    acc = acc_dtype(q.dtype)
    dout = q.new_zeros((B, H, T, values.shape[-1])) if dout is None else dout
    dweights = q.new_zeros((B, H, T, k), dtype=acc) if dweights is None else dweights
    dlse = q.new_zeros((B, H, T), dtype=acc) if dlse is None else dlse
    dq, dkeys, dvalues = torch.ops.l2m.topk_memory_read_backward(
        dout, dweights, dlse, q, keys, values, indices, weights, ctx.scale, ctx.deterministic, ctx.backend)
    needs = ctx.needs_input_grad
    return (dq if needs[0] else None, dkeys if needs[1] else None, dvalues if needs[2] else None,
            None, None, None, None, None)


torch.library.register_autograd("l2m::topk_memory_read", _backward, setup_context=_setup)
