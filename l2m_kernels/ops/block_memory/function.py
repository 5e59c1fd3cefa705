"""Launchers, custom ops and autograd for ``block_topk`` and ``block_read``.

``torch.ops.l2m.block_topk`` returns ``(indices, scores)`` and has no gradient (a selection);
``torch.ops.l2m.block_read`` returns ``(out, lse)`` and its backward op
``torch.ops.l2m.block_read_backward`` gives dense gradients of the block tensors (zero at the blocks
no query read). Each backend plugs its launchers into :data:`TOPK_FWD`, :data:`READ_FWD` and
:data:`READ_BWD`; the cpu ones call the extension's ``block_topk_fwd``, ``block_read_fwd`` and
``block_read_bwd`` (``csrc/cpu/block_memory.cpp``) with every output preallocated.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ... import _ext
from ..._alloc import empty
from .._common import acc_dtype, contiguous_like, declared_op, reference_vjp, register_autograd, rows_for
from .reference import block_read_ref, block_topk_ref
from .validate import check_read_args, check_read_values, check_topk_args


def _block_rows(t: Tensor) -> Tensor:
    """A (B, Hk, NB, S, D) block tensor as the cpu kernels read it: the last two dimensions
    row-major (any strides before them: a block memory narrowed from a larger buffer is read in
    place), else a row-major copy."""
    if t.stride(-1) == 1 and t.stride(-2) == t.shape[-1]:
        return t
    return t.new_empty(t.shape).copy_(t)


def _mask_rows(mask: Optional[Tensor]) -> Optional[Tensor]:
    """A (B, NB, X) validity mask with its last dimension contiguous (else a row-major copy)."""
    if mask is None or mask.stride(-1) == 1:
        return mask
    return mask.new_empty(mask.shape).copy_(mask)


def _cpu():
    ext = _ext.cpu_extension()
    if ext is None:
        raise NotImplementedError(f"backend 'cpu' is unavailable: {_ext.cpu_extension_error()}")
    return ext


# ---- block_topk ----

def _reference_topk_fwd(q, reprs, k, repr_valid, scale):
    indices, scores = block_topk_ref(q, reprs, k, repr_valid, scale)
    return indices.contiguous(), scores.contiguous()


def _cpu_topk_fwd(q, reprs, k, repr_valid, scale):
    B, Hk, NB = reprs.shape[:3]
    indices = empty((B, Hk, k), dtype=torch.int64, device=q.device)
    scores = empty((B, Hk, NB), dtype=acc_dtype(q.dtype), device=q.device)
    if B * Hk:
        _cpu().block_topk_fwd(rows_for("cpu")(q), _block_rows(reprs), _mask_rows(repr_valid), k, scale, indices,
                              scores)
    return indices, scores


TOPK_FWD = {"reference": _reference_topk_fwd, "cpu": _cpu_topk_fwd}


def block_topk_eager(q, reprs, k, repr_valid, scale, backend):
    """The forward on checked arguments, without the dispatcher (no gradient flows through it)."""
    with torch.no_grad():
        return TOPK_FWD[backend](q, reprs, k, repr_valid, scale)


@declared_op("block_topk")
def block_topk_op(q: Tensor, reprs: Tensor, k: int, repr_valid: Optional[Tensor] = None,
                  scale: Optional[float] = None, backend: str = "auto") -> Tuple[Tensor, Tensor]:
    k, scale, backend = check_topk_args(q, reprs, k, repr_valid, scale, backend)
    return TOPK_FWD[backend](q, reprs, k, repr_valid, scale)


@block_topk_op.register_fake
def _(q, reprs, k, repr_valid, scale, backend):
    B, Hk, NB = reprs.shape[:3]
    return q.new_empty((B, Hk, k), dtype=torch.int64), q.new_empty((B, Hk, NB), dtype=acc_dtype(q.dtype))


def _topk_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(*output)


def _topk_backward(ctx, dindices, dscores):
    return None, None, None, None, None, None  # a selection: no input gets a gradient


torch.library.register_autograd("l2m::block_topk", _topk_backward, setup_context=_topk_setup)


# ---- block_read ----

def _reference_read_fwd(q, block_keys, block_values, indices, block_valid, scale):
    out, lse = block_read_ref(q, block_keys, block_values, indices, block_valid, scale)
    return out.contiguous(), lse.contiguous()


def _reference_read_bwd(dout, dlse, q, block_keys, block_values, indices, block_valid, out, lse, scale):
    return tuple(reference_vjp(lambda q_, k_, v_: block_read_ref(q_, k_, v_, indices, block_valid, scale),
                               (q, block_keys, block_values), (dout, dlse), (True, True, True)))


def _cpu_read_fwd(q, block_keys, block_values, indices, block_valid, scale):
    B, H, T, _ = q.shape
    out = empty((B, H, T, block_values.shape[-1]), dtype=q.dtype, device=q.device)
    lse = empty((B, H, T), dtype=acc_dtype(q.dtype), device=q.device)
    if B * H * T:
        rows = rows_for("cpu")
        _cpu().block_read_fwd(rows(q), _block_rows(block_keys), _block_rows(block_values), indices.contiguous(),
                              _mask_rows(block_valid), scale, out, lse)
    return out, lse


def _cpu_read_bwd(dout, dlse, q, block_keys, block_values, indices, block_valid, out, lse, scale):
    dq = empty(q.shape, dtype=q.dtype, device=q.device)
    dkeys = empty(block_keys.shape, dtype=q.dtype, device=q.device)
    dvalues = empty(block_values.shape, dtype=q.dtype, device=q.device)
    rows = rows_for("cpu")
    _cpu().block_read_bwd(rows(dout), dlse.contiguous(), rows(q), _block_rows(block_keys),
                          _block_rows(block_values), indices.contiguous(), _mask_rows(block_valid),
                          out.contiguous(), lse.contiguous(), scale, dq, dkeys, dvalues)
    return dq, dkeys, dvalues


READ_FWD = {"reference": _reference_read_fwd, "cpu": _cpu_read_fwd}
READ_BWD = {"reference": _reference_read_bwd, "cpu": _cpu_read_bwd}


def block_read_fwd(q, block_keys, block_values, indices, block_valid, scale, backend):
    """The forward of ``backend`` on checked arguments: the block ids' values first, then the kernels."""
    check_read_values(block_keys, indices)
    return READ_FWD[backend](q, block_keys, block_values, indices, block_valid, scale)


def block_read_bwd(dout, dlse, q, block_keys, block_values, indices, block_valid, out, lse, scale, backend):
    return READ_BWD[backend](dout, dlse, q, block_keys, block_values, indices, block_valid, out, lse, scale)


@declared_op("block_read")
def block_read_op(q: Tensor, block_keys: Tensor, block_values: Tensor, indices: Tensor,
                  block_valid: Optional[Tensor] = None, scale: Optional[float] = None,
                  backend: str = "auto") -> Tuple[Tensor, Tensor]:
    scale, backend = check_read_args(q, block_keys, block_values, indices, block_valid, scale, backend)
    return block_read_fwd(q, block_keys, block_values, indices, block_valid, scale, backend)


@block_read_op.register_fake
def _(q, block_keys, block_values, indices, block_valid, scale, backend):
    B, H, T, _ = q.shape
    return q.new_empty((B, H, T, block_values.shape[-1])), q.new_empty((B, H, T), dtype=acc_dtype(q.dtype))


@torch.library.custom_op("l2m::block_read_backward", mutates_args=())
def block_read_backward_op(dout: Tensor, dlse: Tensor, q: Tensor, block_keys: Tensor, block_values: Tensor,
                           indices: Tensor, block_valid: Optional[Tensor], out: Tensor, lse: Tensor, scale: float,
                           backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    return block_read_bwd(dout, dlse, q, block_keys, block_values, indices, block_valid, out, lse, scale, backend)


@block_read_backward_op.register_fake
def _(dout, dlse, q, block_keys, block_values, indices, block_valid, out, lse, scale, backend):
    return contiguous_like(q), contiguous_like(block_keys), contiguous_like(block_values)


def _read_setup(ctx, inputs, output):
    q, block_keys, block_values, indices, block_valid, scale, backend = inputs
    if scale is None or backend == "auto":  # the default scale and "auto", as the forward resolved them
        scale, backend = check_read_args(*inputs)
    ctx.save_for_backward(q, block_keys, block_values, indices, block_valid, *output)
    ctx.scale, ctx.backend = scale, backend


def _read_backward(ctx, dout, dlse, *, kernel):
    q, block_keys, block_values, indices, block_valid, out, lse = ctx.saved_tensors
    dout = torch.zeros_like(out) if dout is None else dout
    dlse = torch.zeros_like(lse) if dlse is None else dlse
    dq, dkeys, dvalues = kernel(dout, dlse, q, block_keys, block_values, indices, block_valid, out, lse, ctx.scale,
                                ctx.backend)
    needs = ctx.needs_input_grad
    return (dq if needs[0] else None, dkeys if needs[1] else None, dvalues if needs[2] else None,
            None, None, None, None)


# The eager entry (ops/_common.register_autograd): the same launchers and gradients without the
# dispatcher, whose cost is that of the kernels themselves at one query per head (decoding).
block_read_eager = register_autograd(block_read_op, block_read_fwd, _read_setup, _read_backward,
                                     backward_op=torch.ops.l2m.block_read_backward,
                                     backward_launcher=block_read_bwd)
