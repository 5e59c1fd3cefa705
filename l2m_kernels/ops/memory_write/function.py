"""Launchers, custom ops and autograd for ``gated_memory_write`` and ``gated_dense_update``.

``gated_dense_update_eager`` runs the dense update's launchers and autograd formula without the
dispatcher, for eager calls whose arguments the public function has checked
(:func:`l2m_kernels.ops._common.register_autograd`)."""
from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import Tensor

from ... import _ext
from ..._alloc import empty
from .._common import contiguous_like, declared_op, reference_vjp, register_autograd, rows_for
from .plan import write_plan
from .reference import gated_dense_update_ref, gated_memory_write_ref, gated_memory_write_ref_
from .validate import check_dense_args, check_write_args, check_write_values


def _reference_write_bwd(dnew, memory, indices, weights, add, erase):
    return tuple(reference_vjp(lambda m, w, a, e: gated_memory_write_ref(m, indices, w, a, e),
                               (memory, weights, add, erase), (dnew,), (True, True, True, True)))


def _flat_write_args(memory, indices, weights, add, erase):
    """The GPU kernels' operands: contiguous views with the leading (B, Hm) or (B,) dimensions
    merged into one, G: memory (G, N, D), indices and weights (G, T, kw), add (G, T, D), erase
    (G, T, D or 1)."""
    groups = math.prod(memory.shape[:-2])
    return tuple(t.contiguous().reshape(groups, *t.shape[-2:])
                 for t in (memory, indices, weights, add, erase))


cpu_rows = rows_for("cpu")


def _cpu_write_args(memory, indices, weights, add, erase):
    """The cpu kernel's operands, with their leading (B, Hm) or (B,) dimensions as they are: memory
    (B, Hm, N, D) or (B, N, D) and indices (.., T, kw) contiguous; weights (.., T, kw), add
    (.., T, D) and erase (.., T, D or 1) as models make them (a projection viewed as (B, T, Hm, D)
    and transposed, a slice, a broadcast), read in place when their last dimension is contiguous:
    merging (B, Hm) into one dimension, as the GPU kernels' flat operands do, would copy them."""
    return (memory.contiguous(), indices.contiguous(), cpu_rows(weights), cpu_rows(add),
            cpu_rows(erase))


def _apart_from(target, tensor):
    """``tensor`` as the kernel can read it while it writes ``target`` in place: a strided view of
    the memory being written (``add = memory[:, :, :T]``) is read from a row-major copy, as it was
    before the kernel read strides (the kernel refuses an operand overlapping its output; a
    contiguous one was never copied and is still refused)."""
    shared = tensor.untyped_storage().data_ptr() == target.untyped_storage().data_ptr()
    return tensor.contiguous() if shared else tensor


def _cpu_write_fwd(memory, indices, weights, add, erase):
    out = empty(memory.shape, dtype=memory.dtype, device=memory.device)
    _ext.cpu_extension().gated_memory_write_fwd(*_cpu_write_args(memory, indices, weights, add, erase),
                                                out)
    return out


def _cpu_write_inplace(memory, indices, weights, add, erase):
    # The kernel stores only to written slots of a contiguous memory; a strided one is updated
    # through a contiguous copy (whose unwritten slots copy back unchanged).
    target = memory if memory.is_contiguous() else memory.contiguous()
    weights, add, erase = (_apart_from(target, t) for t in (weights, add, erase))
    _ext.cpu_extension().gated_memory_write_fwd(*_cpu_write_args(target, indices, weights, add, erase),
                                                target)
    if target is not memory:
        memory.copy_(target)
    return memory


def _cpu_write_bwd(dnew, memory, indices, weights, add, erase):
    grads = tuple(empty(t.shape, dtype=t.dtype, device=t.device) for t in (memory, weights, add, erase))
    _ext.cpu_extension().gated_memory_write_bwd(
        dnew.contiguous(), *_cpu_write_args(memory, indices, weights, add, erase), *grads)
    return grads


# GPU backends (triton, cuda): the launcher groups the writes by slot on the device (plan.py), the
# kernels walk each touched slot's chain. Both export the same functions:
#   gated_memory_write_fwd(memory, indices, weights, add, erase, order, run_length, out)
#       flat (G, ...) contiguous inputs (see _flat_write_args), the plan of indices.view(G, T * kw);
#       stores the written slots of out (G, N, D) only: out is a copy of memory, or memory itself.
#   gated_memory_write_bwd(dnew, memory, indices, weights, add, erase, order, run_length,
#                          [cuda: dweight_partial,] dmemory, dweights, add_parts, erase_parts)
#       dmemory (G, N, D) arrives as a copy of dnew (the kernel stores the written slots), dweights
#       (G, T, kw) and the float32 (float64) per-entry parts add_parts (G * T * kw, D) and
#       erase_parts (G * T * kw, erase_dim) arrive zeroed; the entry (g, t, j) gets w * dm in
#       add_parts and its derase contribution in erase_parts (summed here over j, in j order).
#       The cuda kernel also takes dweight_partial (G * T * kw,) float32 scratch, each entry's
#       running dweight over its column chunks.

def _gpu_kernels(backend: str):
    if backend == "cuda":
        return _ext.cuda_extension()
    from . import triton as triton_kernels
    return triton_kernels


def _gpu_write_into(backend, target, memory, indices, weights, add, erase):
    """Apply the writes to ``target`` (memory's values, contiguous) through the backend's kernel."""
    flat = _flat_write_args(memory, indices, weights, add, erase)
    num_slots = flat[0].shape[1]
    # Explicit sizes: view(G, -1) is ambiguous when G == 0.
    plan = write_plan(flat[1].view(flat[1].shape[0], math.prod(flat[1].shape[1:])), num_slots)
    if plan.order.numel() and flat[0].shape[-1]:
        _gpu_kernels(backend).gated_memory_write_fwd(*flat, plan.order, plan.run_length,
                                                     target.view(flat[0].shape))
    return target


def _gpu_write_fwd(backend):
    def fwd(memory, indices, weights, add, erase):
        out = empty(memory.shape, dtype=memory.dtype, device=memory.device)
        out.copy_(memory)
        # The writes then run in place on the copy: a strided memory is copied once, not twice.
        return _gpu_write_into(backend, out, out, indices, weights, add, erase)
    return fwd


def _gpu_write_inplace(backend):
    def inplace(memory, indices, weights, add, erase):
        target = memory if memory.is_contiguous() else memory.contiguous()
        _gpu_write_into(backend, target, target, indices, weights, add, erase)
        if target is not memory:
            memory.copy_(target)
        return memory
    return inplace


def _gpu_write_bwd(backend):
    def bwd(dnew, memory, indices, weights, add, erase):
        flat = _flat_write_args(memory, indices, weights, add, erase)
        groups, num_slots, dim = flat[0].shape
        steps, writes_per_step = flat[1].shape[1:]
        erase_dim = flat[4].shape[-1]
        acc = torch.float64 if memory.dtype == torch.float64 else torch.float32
        entries = groups * steps * writes_per_step
        dmemory = empty(memory.shape, dtype=memory.dtype, device=memory.device)
        dmemory.copy_(dnew)
        dweights = torch.zeros(weights.shape, dtype=weights.dtype, device=memory.device)
        add_parts = torch.zeros((entries, dim), dtype=acc, device=memory.device)
        erase_parts = torch.zeros((entries, erase_dim), dtype=acc, device=memory.device)
        plan = write_plan(flat[1].view(groups, steps * writes_per_step), num_slots)
        if entries and dim:
            scratch = (torch.empty(entries, dtype=torch.float32, device=memory.device),) if backend == "cuda" else ()
            _gpu_kernels(backend).gated_memory_write_bwd(
                dnew.contiguous().view(flat[0].shape), *flat, plan.order, plan.run_length, *scratch,
                dmemory.view(flat[0].shape), dweights.view(flat[2].shape), add_parts, erase_parts)
        # Sums over the kw entries of each step, in j order (a fixed reduction: deterministic).
        dadd = add_parts.view(groups, steps, writes_per_step, dim).sum(2).to(add.dtype)
        derase = erase_parts.view(groups, steps, writes_per_step, erase_dim).sum(2).to(erase.dtype)
        return dmemory, dweights, dadd.view(add.shape), derase.view(erase.shape)
    return bwd


WRITE_FWD = {"reference": lambda memory, indices, weights, add, erase:
             gated_memory_write_ref(memory, indices, weights, add, erase).contiguous(),
             "cpu": _cpu_write_fwd, **{name: _gpu_write_fwd(name) for name in ("triton", "cuda")}}
WRITE_INPLACE = {"reference": gated_memory_write_ref_, "cpu": _cpu_write_inplace,
                 **{name: _gpu_write_inplace(name) for name in ("triton", "cuda")}}
WRITE_BWD = {"reference": _reference_write_bwd, "cpu": _cpu_write_bwd,
             **{name: _gpu_write_bwd(name) for name in ("triton", "cuda")}}


@declared_op("gated_memory_write")
def gated_memory_write_op(memory: Tensor, indices: Tensor, weights: Tensor, add: Tensor, erase: Tensor,
                          backend: str = "auto") -> Tensor:
    backend = check_write_args(memory, indices, weights, add, erase, backend)
    check_write_values(memory, indices, weights, add, erase)
    return WRITE_FWD[backend](memory, indices, weights, add, erase)


@gated_memory_write_op.register_fake
def _(memory, indices, weights, add, erase, backend):
    return contiguous_like(memory)


@torch.library.custom_op("l2m::gated_memory_write_", mutates_args=("memory",))
def gated_memory_write_inplace_op(memory: Tensor, indices: Tensor, weights: Tensor, add: Tensor,
                                  erase: Tensor, backend: str = "auto") -> None:
    backend = check_write_args(memory, indices, weights, add, erase, backend)
    check_write_values(memory, indices, weights, add, erase)
    WRITE_INPLACE[backend](memory, indices, weights, add, erase)


@gated_memory_write_inplace_op.register_fake
def _(memory, indices, weights, add, erase, backend):
    return None


@torch.library.custom_op("l2m::gated_memory_write_backward", mutates_args=())
def gated_memory_write_backward_op(dnew: Tensor, memory: Tensor, indices: Tensor, weights: Tensor,
                                   add: Tensor, erase: Tensor, backend: str
                                   ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return WRITE_BWD[backend](dnew, memory, indices, weights, add, erase)


@gated_memory_write_backward_op.register_fake
def _(dnew, memory, indices, weights, add, erase, backend):
    return (contiguous_like(memory), contiguous_like(weights), contiguous_like(add),
            contiguous_like(erase))


def _write_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:5])
    ctx.backend = check_write_args(*inputs)  # "auto" resolved as the forward did


def _write_backward(ctx, dnew):
    memory, indices, weights, add, erase = ctx.saved_tensors
    grads = torch.ops.l2m.gated_memory_write_backward(dnew, memory, indices, weights, add, erase,
                                                      ctx.backend)
    needs = ctx.needs_input_grad
    dmemory, dweights, dadd, derase = grads
    return (dmemory if needs[0] else None, None, dweights if needs[2] else None,
            dadd if needs[3] else None, derase if needs[4] else None, None)


torch.library.register_autograd("l2m::gated_memory_write", _write_backward, setup_context=_write_setup)


# ----------------------------------------------------------------------------------------------
# gated_dense_update
# ----------------------------------------------------------------------------------------------

def _broadcast_views4(*tensors):
    """The tensors as 4-D views of their broadcast shape, without copying: broadcast dimensions get
    stride 0 (the kernels index every operand by its own strides). Shapes of more than four
    dimensions are materialised, contiguous, and flattened to (1, 1, 1, numel)."""
    shape = torch.broadcast_shapes(*(t.shape for t in tensors))
    if len(shape) > 4:
        flat = tuple(t.expand(shape).contiguous().view(1, 1, 1, -1) for t in tensors)
        return flat, shape
    shape4 = (1,) * (4 - len(shape)) + tuple(shape)
    return tuple(t.expand(shape4) for t in tensors), shape


def _dense_views(backend, *inputs):
    """The four inputs as ``backend``'s kernels take them: 4-D views of the broadcast shape, read
    where they lie (a gate broadcast over any dimension is not materialised). The cpu kernels need
    the last dimension's stride to be 1 or 0; a view with any other is copied."""
    views, shape = _broadcast_views4(*inputs)
    if backend == "cpu":
        views = tuple(v if v.stride(-1) in (0, 1) or v.shape[-1] <= 1 else v.contiguous() for v in views)
    return views, shape


def _dense_kernels(backend: str):
    return _ext.cpu_extension() if backend == "cpu" else _gpu_kernels(backend)


# Every fused backend exports, on 4-D views of the broadcast shape (strides as _dense_views gives):
#   gated_dense_update_fwd(memory, update, input_gate, forget_gate, out)       out contiguous 4-D
#   gated_dense_update_bwd(dout, memory, update, input_gate, forget_gate,
#                          dmemory, dupdate, dinput_gate, dforget_gate)
#       dout contiguous 4-D; the four gradients contiguous 4-D of the broadcast shape in float32
#       (float64 for float64), reduced here to each input's shape before the one rounding. The cpu
#       kernel also takes (S0, S1, S2, 1) for an input broadcast along the last dimension (stride 0)
#       and sums that gradient along it as it goes.
def _fused_dense_fwd(backend):
    def fwd(memory, update, input_gate, forget_gate):
        views, shape = _dense_views(backend, memory, update, input_gate, forget_gate)
        out = empty(views[0].shape, dtype=memory.dtype, device=memory.device)
        if out.numel():
            _dense_kernels(backend).gated_dense_update_fwd(*views, out)
        return out.view(shape)
    return fwd


def _fused_dense_bwd(backend):
    def bwd(dout, memory, update, input_gate, forget_gate):
        inputs = (memory, update, input_gate, forget_gate)
        views, shape = _dense_views(backend, *inputs)
        acc = torch.float64 if memory.dtype == torch.float64 else torch.float32
        full = views[0].shape
        # cpu: an input that the op broadcasts along the last dimension (its own is 1 or absent) gets
        # its gradient summed along it by the kernel. (An input that is itself an expanded view
        # has a gradient per element, summed by autograd.)
        summed = [backend == "cpu" and len(shape) <= 4 and full[-1] > 1 and (t.dim() == 0 or t.shape[-1] == 1)
                  for t in inputs]
        grads = tuple(empty(full[:-1] + (1,) if s else full, dtype=acc, device=memory.device) for s in summed)
        if dout.numel():
            _dense_kernels(backend).gated_dense_update_bwd(
                dout.to(memory.dtype).contiguous().view(full), *views, *grads)
        return tuple((g.view(shape[:-1] + (1,)) if s else g.view(shape)).sum_to_size(t.shape).to(t.dtype)
                     for g, s, t in zip(grads, summed, inputs))
    return bwd


DENSE_FWD = {"reference": lambda m, u, i, f: gated_dense_update_ref(m, u, i, f).contiguous(),
             **{name: _fused_dense_fwd(name) for name in ("cpu", "triton", "cuda")}}
DENSE_BWD = {"reference": lambda dout, m, u, i, f: tuple(
    reference_vjp(gated_dense_update_ref, (m, u, i, f), (dout,), (True, True, True, True))),
             **{name: _fused_dense_bwd(name) for name in ("cpu", "triton", "cuda")}}


@declared_op("gated_dense_update")
def gated_dense_update_op(memory: Tensor, update: Tensor, input_gate: Tensor, forget_gate: Tensor,
                          backend: str = "auto") -> Tensor:
    backend = check_dense_args(memory, update, input_gate, forget_gate, backend)
    return DENSE_FWD[backend](memory, update, input_gate, forget_gate)


@gated_dense_update_op.register_fake
def _(memory, update, input_gate, forget_gate, backend):
    shape = torch.broadcast_shapes(memory.shape, update.shape, input_gate.shape, forget_gate.shape)
    return memory.new_empty(shape)


@torch.library.custom_op("l2m::gated_dense_update_backward", mutates_args=())
def gated_dense_update_backward_op(dout: Tensor, memory: Tensor, update: Tensor, input_gate: Tensor,
                                   forget_gate: Tensor, backend: str
                                   ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return DENSE_BWD[backend](dout, memory, update, input_gate, forget_gate)


@gated_dense_update_backward_op.register_fake
def _(dout, memory, update, input_gate, forget_gate, backend):
    return tuple(contiguous_like(t) for t in (memory, update, input_gate, forget_gate))


def _dense_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:4])
    backend = inputs[4]
    ctx.backend = backend if backend != "auto" else check_dense_args(*inputs)  # as the forward resolved it


def _dense_backward(ctx, dout, *, kernel):
    grads = kernel(dout, *ctx.saved_tensors, ctx.backend)
    return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad)) + (None,)


gated_dense_update_eager = register_autograd(
    gated_dense_update_op, lambda m, u, i, f, backend: DENSE_FWD[backend](m, u, i, f), _dense_setup,
    _dense_backward, backward_op=torch.ops.l2m.gated_dense_update_backward,
    backward_launcher=lambda dout, m, u, i, f, backend: DENSE_BWD[backend](dout, m, u, i, f))
