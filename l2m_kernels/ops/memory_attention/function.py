"""Launchers, custom ops and autograd for ``memory_attention``.

The backward op receives the memory indices chosen by the forward, so the memory part of the
backward is sparse. Without a gate (``merge="joint"``) the gate gradient slot returns an empty
tensor, mapped to None for autograd.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .._common import acc_dtype, contiguous_like, declared_op, reference_vjp
from ..topk_read.reference import topk_read_select
from .reference import memory_attention_gather
from .validate import check_args, check_values


def _reference_fwd(q, k, v, mem_keys, mem_values, topk, window, merge, gate, scale, valid_len, deterministic):
    indices = topk_read_select(q, mem_keys, topk, scale, valid_len)
    out, lse_local, lse_mem = memory_attention_gather(q, k, v, mem_keys, mem_values, indices, window,
                                                      merge, gate, scale)
    return out.contiguous(), lse_local.contiguous(), lse_mem.contiguous(), indices.contiguous()


def _reference_bwd(dout, dlse_local, dlse_mem, q, k, v, mem_keys, mem_values, indices, out, lse_local,
                   lse_mem, window, merge, gate, scale, deterministic):
    # out, lse_local and lse_mem (the forward's results, for the fused backwards) are recomputed here.
    has_gate = gate is not None
    primals = (q, k, v, mem_keys, mem_values, gate if has_gate else q.new_empty(0))

    def fn(q_, k_, v_, mk_, mv_, g_):
        return memory_attention_gather(q_, k_, v_, mk_, mv_, indices, window, merge,
                                       g_ if has_gate else None, scale)

    grads = reference_vjp(fn, primals, (dout, dlse_local, dlse_mem), (True,) * 5 + (has_gate,))
    if not has_gate:
        grads[5] = q.new_empty(0)
    return tuple(grads)


def _fused(backend: str):
    if backend == "cpu":
        from . import cpu as kernels
    elif backend == "cuda":
        from . import cuda as kernels
    else:
        from . import triton as kernels
    return kernels


# Fused backends: modules cpu.py, cuda.py and triton.py export memory_attention_fwd and
# memory_attention_bwd with the signatures of _reference_fwd and _reference_bwd.
FWD = {"reference": _reference_fwd,
       **{name: (lambda *args, _name=name: _fused(_name).memory_attention_fwd(*args))
          for name in ("cpu", "cuda", "triton")}}
BWD = {"reference": _reference_bwd,
       **{name: (lambda *args, _name=name: _fused(_name).memory_attention_bwd(*args))
          for name in ("cpu", "cuda", "triton")}}


@declared_op("memory_attention")
def memory_attention_op(q: Tensor, k: Tensor, v: Tensor, mem_keys: Tensor, mem_values: Tensor, topk: int,
                        window: Optional[int] = None, merge: str = "joint", gate: Optional[Tensor] = None,
                        scale: Optional[float] = None, valid_len: Optional[Tensor] = None,
                        deterministic: bool = False, backend: str = "auto"
                        ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    args = (q, k, v, mem_keys, mem_values, topk, window, merge, gate, scale, valid_len, deterministic, backend)
    topk, window, scale, valid_len, deterministic, backend = check_args(*args)
    check_values(*args)
    return FWD[backend](q, k, v, mem_keys, mem_values, topk, window, merge, gate, scale, valid_len,
                        deterministic)


@memory_attention_op.register_fake
def _(q, k, v, mem_keys, mem_values, topk, window, merge, gate, scale, valid_len, deterministic, backend):
    B, H, T, _ = q.shape
    acc = acc_dtype(q.dtype)
    return (q.new_empty((B, H, T, v.shape[-1])), q.new_empty((B, H, T), dtype=acc),
            q.new_empty((B, H, T), dtype=acc), q.new_empty((B, H, T, topk), dtype=torch.int64))


@torch.library.custom_op("l2m::memory_attention_backward", mutates_args=())
def memory_attention_backward_op(dout: Tensor, dlse_local: Tensor, dlse_mem: Tensor, q: Tensor, k: Tensor,
                                 v: Tensor, mem_keys: Tensor, mem_values: Tensor, indices: Tensor, out: Tensor,
                                 lse_local: Tensor, lse_mem: Tensor, window: Optional[int], merge: str,
                                 gate: Optional[Tensor], scale: float, deterministic: bool, backend: str
                                 ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return BWD[backend](dout, dlse_local, dlse_mem, q, k, v, mem_keys, mem_values, indices, out, lse_local,
                        lse_mem, window, merge, gate, scale, deterministic)


@memory_attention_backward_op.register_fake
def _(dout, dlse_local, dlse_mem, q, k, v, mem_keys, mem_values, indices, out, lse_local, lse_mem, window,
      merge, gate, scale, deterministic, backend):
    dgate = contiguous_like(gate) if gate is not None else q.new_empty(0)
    return tuple(contiguous_like(t) for t in (q, k, v, mem_keys, mem_values)) + (dgate,)


def _setup(ctx, inputs, output):
    q, k, v, mem_keys, mem_values, topk, window, merge, gate, scale, valid_len, deterministic, backend = inputs
    # defaults and "auto", resolved as the forward did
    topk, window, scale, valid_len, deterministic, backend = check_args(*inputs)
    ctx.has_gate = gate is not None
    ctx.save_for_backward(q, k, v, mem_keys, mem_values, output[3], output[0], output[1], output[2],
                          gate if gate is not None else q.new_empty(0))
    ctx.options = (window, merge, scale, deterministic, backend)


def _backward(ctx, dout, dlse_local, dlse_mem, dindices):
    q, k, v, mem_keys, mem_values, indices, out, lse_local, lse_mem, gate = ctx.saved_tensors
    gate = gate if ctx.has_gate else None
    window, merge, scale, deterministic, backend = ctx.options
    B, H, T, _ = q.shape
    acc = acc_dtype(q.dtype)
    dout = q.new_zeros((B, H, T, v.shape[-1])) if dout is None else dout
    dlse_local = q.new_zeros((B, H, T), dtype=acc) if dlse_local is None else dlse_local
    dlse_mem = q.new_zeros((B, H, T), dtype=acc) if dlse_mem is None else dlse_mem
    grads = torch.ops.l2m.memory_attention_backward(dout, dlse_local, dlse_mem, q, k, v, mem_keys, mem_values,
                                                    indices, out, lse_local, lse_mem, window, merge, gate,
                                                    scale, deterministic, backend)
    needs = ctx.needs_input_grad
    dq, dk, dv, dmk, dmv, dgate = grads
    return (dq if needs[0] else None, dk if needs[1] else None, dv if needs[2] else None,
            dmk if needs[3] else None, dmv if needs[4] else None, None, None, None,
            dgate if (ctx.has_gate and needs[8]) else None, None, None, None, None)


torch.library.register_autograd("l2m::memory_attention", _backward, setup_context=_setup)
