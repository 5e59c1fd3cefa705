"""Launchers, custom ops and autograd for ``merge_attention`` and ``gated_merge``.

The four row kernels (see ``csrc/cpu/merge.cpp``, ``csrc/cuda/merge.h``, ``triton.py``) take
(R, D) rows and (R,) per-row values, with every output preallocated. The launchers here flatten
(B, H, T) into rows, allocate outputs with :func:`l2m_kernels._alloc.empty`, and pick the backend's
kernel table. ``torch.ops.l2m.merge_attention`` / ``gated_merge`` (and their ``*_backward``) are the
custom ops; autograd is registered on the forward ops and calls the backward ops.
``merge_attention_eager`` / ``gated_merge_eager`` run the same launchers and the same autograd
formulas without the dispatcher, for eager calls whose arguments the public function has checked
(:func:`l2m_kernels.ops._common.register_autograd`).
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from ... import _ext
from ..._alloc import empty
from .._common import contiguous_like, declared_op, register_autograd
from .reference import gated_merge_ref, merge_attention_ref
from .validate import check_gated_merge_args, check_merge_args


class _ReferenceRowKernels:
    """The row-kernel interface served by the reference (used by the custom op with backend="reference")."""

    @staticmethod
    def merge_attention_fwd(out_a, lse_a, out_b, lse_b, out, lse):
        o, l = merge_attention_ref(out_a[None, None], lse_a[None, None], out_b[None, None], lse_b[None, None])
        out.copy_(o[0, 0])
        lse.copy_(l[0, 0])

    @staticmethod
    def merge_attention_bwd(dout, dlse, out_a, lse_a, out_b, lse_b, lse, d_out_a, d_lse_a, d_out_b, d_lse_b):
        _, vjp = torch.func.vjp(lambda *x: merge_attention_ref(*x), out_a[None, None], lse_a[None, None],
                                out_b[None, None], lse_b[None, None])
        grads = vjp((dout[None, None], dlse[None, None]))
        for dst, g in zip((d_out_a, d_lse_a, d_out_b, d_lse_b), grads):
            dst.copy_(g[0, 0])

    @staticmethod
    def gated_merge_fwd(out_local, out_mem, gate, out):
        out.copy_(gated_merge_ref(out_local, out_mem, gate[:, None]))

    @staticmethod
    def gated_merge_bwd(dout, out_local, out_mem, gate, d_local, d_mem, d_gate):
        acc = d_gate.dtype
        _, vjp = torch.func.vjp(lambda a, b, g: gated_merge_ref(a, b, g.to(acc)[:, None]), out_local, out_mem, gate)
        dl, dm, dg = vjp(dout)
        d_local.copy_(dl)
        d_mem.copy_(dm)
        # The gate gradient in the accumulation dtype, before any rounding to the gate's dtype.
        g = torch.sigmoid(gate.to(acc))
        d_gate.copy_(g * (1 - g) * (dout.to(acc) * (out_mem.to(acc) - out_local.to(acc))).sum(-1))
        del dg


def row_kernels(backend: str):
    """The object exposing the four row kernels of ``backend``."""
    if backend == "cpu":
        module = _ext.cpu_extension()
        if module is None:
            raise NotImplementedError(f"backend 'cpu' is unavailable: {_ext.cpu_extension_error()}")
        return module
    if backend == "cuda":
        module = _ext.cuda_extension()
        if module is None:
            raise NotImplementedError(f"backend 'cuda' is unavailable: {_ext.cuda_extension_error()}")
        return module
    if backend == "triton":
        from . import triton as triton_kernels
        return triton_kernels
    if backend == "reference":
        return _ReferenceRowKernels
    raise ValueError(f"backend: unknown backend {backend!r}")


def _rows(t: Tensor, d: int | None) -> Tensor:
    # (..., D) -> (rows, D) by flattening the leading dims (view(-1, D) is ambiguous when D == 0).
    t = t.contiguous()
    return t.flatten(0, -2) if d is not None else t.view(-1)


# ----------------------------------------------------------------------------------------------
# merge_attention
# ----------------------------------------------------------------------------------------------

def merge_attention_fwd(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor,
                        backend: str) -> Tuple[Tensor, Tensor]:
    B, H, T, D = out_a.shape
    out = empty((B, H, T, D), dtype=out_a.dtype, device=out_a.device)
    lse = empty((B, H, T), dtype=lse_a.dtype, device=out_a.device)
    if out.numel() or lse.numel():
        row_kernels(backend).merge_attention_fwd(_rows(out_a, D), _rows(lse_a, None), _rows(out_b, D),
                                                 _rows(lse_b, None), out.flatten(0, -2), lse.view(-1))
    return out, lse


def merge_attention_bwd(dout, dlse, out_a, lse_a, out_b, lse_b, lse, backend):
    B, H, T, D = out_a.shape
    grads = (empty(out_a.shape, dtype=out_a.dtype, device=out_a.device),
             empty(lse_a.shape, dtype=lse_a.dtype, device=out_a.device),
             empty(out_b.shape, dtype=out_b.dtype, device=out_a.device),
             empty(lse_b.shape, dtype=lse_b.dtype, device=out_a.device))
    if lse.numel():
        row_kernels(backend).merge_attention_bwd(
            _rows(dout, D), _rows(dlse, None), _rows(out_a, D), _rows(lse_a, None), _rows(out_b, D),
            _rows(lse_b, None), _rows(lse, None), grads[0].flatten(0, -2), grads[1].view(-1),
            grads[2].flatten(0, -2), grads[3].view(-1))
    return grads


@declared_op("merge_attention")
def merge_attention_op(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor,
                       backend: str = "auto") -> Tuple[Tensor, Tensor]:
    backend = check_merge_args(out_a, lse_a, out_b, lse_b, backend)
    return merge_attention_fwd(out_a, lse_a, out_b, lse_b, backend)


@merge_attention_op.register_fake
def _(out_a, lse_a, out_b, lse_b, backend):
    return contiguous_like(out_a), \
        contiguous_like(lse_a)


@torch.library.custom_op("l2m::merge_attention_backward", mutates_args=())
def merge_attention_backward_op(dout: Tensor, dlse: Tensor, out_a: Tensor, lse_a: Tensor, out_b: Tensor,
                                lse_b: Tensor, lse: Tensor, backend: str
                                ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return merge_attention_bwd(dout, dlse, out_a, lse_a, out_b, lse_b, lse, backend)


@merge_attention_backward_op.register_fake
def _(dout, dlse, out_a, lse_a, out_b, lse_b, lse, backend):
    return tuple(contiguous_like(t) for t in (out_a, lse_a, out_b, lse_b))


def _merge_attention_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:4], output[1])
    backend = inputs[4]
    ctx.backend = backend if backend != "auto" else check_merge_args(*inputs)  # as the forward resolved it


def _merge_attention_backward(ctx, dout, dlse, *, kernel):
    out_a, lse_a, out_b, lse_b, lse = ctx.saved_tensors
    dout = torch.zeros_like(out_a) if dout is None else dout
    dlse = torch.zeros_like(lse) if dlse is None else dlse
    grads = kernel(dout, dlse, out_a, lse_a, out_b, lse_b, lse, ctx.backend)
    needs = ctx.needs_input_grad
    return tuple(g if needs[i] else None for i, g in enumerate(grads)) + (None,)


merge_attention_eager = register_autograd(
    merge_attention_op, merge_attention_fwd, _merge_attention_setup, _merge_attention_backward,
    backward_op=torch.ops.l2m.merge_attention_backward, backward_launcher=merge_attention_bwd)


# ----------------------------------------------------------------------------------------------
# gated_merge
# ----------------------------------------------------------------------------------------------

def _gate_rows(gate: Tensor, B: int, H: int, T: int) -> Tensor:
    # gate broadcasts to (B, H, T, 1); the kernels take one logit per row.
    return gate.expand(B, H, T, 1).reshape(-1)


def gated_merge_fwd(out_local: Tensor, out_mem: Tensor, gate: Tensor, backend: str) -> Tensor:
    B, H, T, D = out_local.shape
    out = empty((B, H, T, D), dtype=out_local.dtype, device=out_local.device)
    if out.numel():
        row_kernels(backend).gated_merge_fwd(_rows(out_local, D), _rows(out_mem, D),
                                             _gate_rows(gate, B, H, T).contiguous(), out.flatten(0, -2))
    return out


def gated_merge_bwd(dout, out_local, out_mem, gate, backend):
    B, H, T, D = out_local.shape
    acc = torch.float64 if out_local.dtype == torch.float64 else torch.float32
    d_local = empty(out_local.shape, dtype=out_local.dtype, device=out_local.device)
    d_mem = empty(out_mem.shape, dtype=out_mem.dtype, device=out_local.device)
    d_gate_rows = empty((B, H, T), dtype=acc, device=out_local.device)
    if d_local.numel():
        row_kernels(backend).gated_merge_bwd(_rows(dout, D), _rows(out_local, D), _rows(out_mem, D),
                                             _gate_rows(gate, B, H, T).contiguous(), d_local.flatten(0, -2),
                                             d_mem.flatten(0, -2), d_gate_rows.view(-1))
    else:
        d_gate_rows.zero_()
    # Reduce the per-row gate gradient over the dimensions the gate was broadcast along.
    d_gate = d_gate_rows.unsqueeze(-1).sum_to_size(gate.shape) if gate.dim() else d_gate_rows.sum()
    return d_local, d_mem, d_gate.to(gate.dtype).reshape(gate.shape)


@declared_op("gated_merge")
def gated_merge_op(out_local: Tensor, out_mem: Tensor, gate: Tensor, backend: str = "auto") -> Tensor:
    backend = check_gated_merge_args(out_local, out_mem, gate, backend)
    return gated_merge_fwd(out_local, out_mem, gate, backend)


@gated_merge_op.register_fake
def _(out_local, out_mem, gate, backend):
    return contiguous_like(out_local)


@torch.library.custom_op("l2m::gated_merge_backward", mutates_args=())
def gated_merge_backward_op(dout: Tensor, out_local: Tensor, out_mem: Tensor, gate: Tensor,
                            backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    return gated_merge_bwd(dout, out_local, out_mem, gate, backend)


@gated_merge_backward_op.register_fake
def _(dout, out_local, out_mem, gate, backend):
    like = contiguous_like
    return like(out_local), like(out_mem), like(gate)


def _gated_merge_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:3])
    backend = inputs[3]
    ctx.backend = backend if backend != "auto" else check_gated_merge_args(*inputs)  # as the forward resolved it


def _gated_merge_backward(ctx, dout, *, kernel):
    out_local, out_mem, gate = ctx.saved_tensors
    grads = kernel(dout, out_local, out_mem, gate, ctx.backend)
    needs = ctx.needs_input_grad
    return tuple(g if needs[i] else None for i, g in enumerate(grads)) + (None,)


gated_merge_eager = register_autograd(
    gated_merge_op, gated_merge_fwd, _gated_merge_setup, _gated_merge_backward,
    backward_op=torch.ops.l2m.gated_merge_backward, backward_launcher=gated_merge_bwd)
